"""`exegpt keys`: CURVE key pairs for the coordinator, its clients and (optionally) workers.

Layout written under ``--dir`` (default ``./keys``)::

    server.key, server.key_secret            the coordinator's pair (--curve-server-key)
    clients/client-<i>.key(_secret)          one pair per client (give each its .key_secret
                                             and server.key)
    allow/client-<i>.key                     the client allow-list (--curve-allow)
    workers/worker-<i>.key(_secret)          with --workers N: pairs for workers
    allow-workers/worker-<i>.key             their allow-list (--curve-worker-allow)
    mesh.key, mesh.key_secret                with --workers N: the pair every worker holds
                                             for CURVE between KV endpoints (--curve-mesh-key)

Running it again keeps the existing pairs (an existing server key stays valid for deployed
clients) and only adds the ones missing; ``--force`` makes every pair anew. Secret files are
written owner-read-only. Revoking a client is deleting its file from ``allow/`` (the coordinator
re-reads the directory when it changes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "keys", help="make CURVE keys: a server pair, client pairs and the allow-list",
        description="Write CURVE key pairs (zmq.auth certificates) for `exegpt serve "
        "--curve-dir` / `python -m coordinator --curve-server-key --curve-allow`.")
    p.add_argument("--dir", default=os.environ.get("EXEGPT_CURVE_DIR", "keys"),
                   help="where to write the keys (default ./keys; $EXEGPT_CURVE_DIR)")
    p.add_argument("--clients", type=int, default=1, help="client key pairs to have (default 1)")
    p.add_argument("--workers", type=int, default=0,
                   help="worker key pairs (CURVE between coordinator and workers)")
    p.add_argument("--force", action="store_true", help="replace every existing key pair")
    p.set_defaults(func=run)


def _pair(directory: Path, name: str, force: bool) -> tuple[Path, Path, bool]:
    """(public file, secret file, made now): an existing pair is kept unless ``force``."""
    import zmq.auth

    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    if public.exists() and secret.exists() and not force:
        return public, secret, False
    directory.mkdir(parents=True, exist_ok=True)
    made_public, made_secret = zmq.auth.create_certificates(directory, name)
    os.chmod(made_secret, 0o600)
    return Path(made_public), Path(made_secret), True


def write_keys(root: Path, num_clients: int, num_workers: int = 0,
               force: bool = False) -> dict[str, list[Path]]:
    """Make (or complete) the key layout; returns the files written, by kind."""
    if num_clients < 0 or num_workers < 0:
        raise ValueError("--clients and --workers must be >= 0")
    made: dict[str, list[Path]] = {"server": [], "clients": [], "workers": [], "mesh": []}
    _, secret, new = _pair(root, "server", force)
    if new:
        made["server"].append(secret)
    if num_workers:  # the KV endpoints' shared pair (common/meshcurve.py)
        _, secret, new = _pair(root, "mesh", force)
        if new:
            made["mesh"].append(secret)
    for kind, prefix, count in (("clients", "client", num_clients),
                                ("workers", "worker", num_workers)):
        allow = root / ("allow" if kind == "clients" else "allow-workers")
        if count:
            allow.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            public, secret, new = _pair(root / kind, f"{prefix}-{i}", force)
            shutil.copyfile(public, allow / public.name)
            if new:
                made[kind].append(secret)
    return made


def run(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    try:
        made = write_keys(root, args.clients, args.workers, args.force)
    except (OSError, ValueError) as exc:
        print(f"exegpt keys: {exc}", file=sys.stderr)
        return 2
    total = sum(len(v) for v in made.values())
    print(f"{root}: {total} new key pair(s) "
          f"(server {len(made['server'])}, clients {len(made['clients'])}, "
          f"workers {len(made['workers'])}, mesh {len(made['mesh'])})")
    print(f"coordinator: --curve-server-key {root}/server.key_secret --curve-allow {root}/allow"
          + (f" --curve-worker-allow {root}/allow-workers" if args.workers else ""))
    if args.workers:
        print(f"worker <i>:  --curve-coordinator-key {root}/server.key --curve-key "
              f"{root}/workers/worker-<i>.key_secret --curve-mesh-key {root}/mesh.key_secret")
    print(f"client:      --server-key {root}/server.key --client-key "
          f"{root}/clients/client-0.key_secret")
    return 0
