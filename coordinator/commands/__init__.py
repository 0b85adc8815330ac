"""`exegpt` subcommands, one module each.

A module here that defines ``register(subparsers)`` is a subcommand; modules named
``bench_<name>`` register under ``exegpt bench <name>``. ``register`` adds its parser and sets
``func=run`` (a callable taking the parsed args and returning an exit code). Heavy imports
(torch, the engine) belong inside ``run`` so that ``exegpt --help`` and the coordinator stay light.
"""
