"""The `exegpt` console script: discovers subcommand modules in `coordinator.commands`."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from coordinator import commands


def _command_modules() -> list[str]:
    modules = pkgutil.iter_modules(commands.__path__)
    return sorted(m.name for m in modules if not m.name.startswith("_"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exegpt", description="An LLM inference server that plans before it serves."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    bench_sub = None
    for name in _command_modules():
        module = importlib.import_module(f"{commands.__name__}.{name}")
        if not hasattr(module, "register"):
            continue
        if name.startswith("bench_"):
            if bench_sub is None:
                bench = sub.add_parser(
                    "bench", help="the evaluation (exegpt vs baselines on the mesh); "
                    "microbenchmarks: engine, transport, planner ...",
                    description="Without TARGET: the evaluation (`exegpt bench eval --help`).")
                bench_sub = bench.add_subparsers(
                    dest="bench_command", metavar="TARGET", required=False
                )
            module.register(bench_sub)
            if hasattr(module, "register_default"):  # bare `exegpt bench` runs this one
                module.register_default(bench)
        else:
            module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
