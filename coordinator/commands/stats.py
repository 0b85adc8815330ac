"""`exegpt stats`: how a running mesh is doing, per worker and overall, against its plan.

    exegpt stats                                  # EXEGPT_COORDINATOR_ENDPOINT or 127.0.0.1:5555
    exegpt stats --connect tcp://host:5555        # (--endpoint is the same flag)
    exegpt stats --plan runs/up-plan.json         # compare with this plan (default: the plan
                                                  # the coordinator was started with, if any)
    exegpt stats --json                           # one JSON object (--watch: one per line)
    exegpt stats --requests                       # + the recent requests' lifecycles
    exegpt stats --watch 2                        # refresh every 2 s until Ctrl-C

The coordinator measures (coordinator/metrics.py; definitions in docs/stats.md): throughput,
latency percentiles, TTFT, time per output token, the p99-length latency the plan bounds,
encode/decode batch sizes over time, B_E adjustments, KV bytes moved, per worker and overall,
next to the plan's predictions. Exit status: 0 ok, 1 the coordinator did not answer, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from coordinator.commands._connect import add_curve_args, apply_curve_args

WIDTH_WHEN_PIPED = 132  # rich would wrap at 80 columns: keep a row on one line in logs


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("stats", help="throughput/latency/batching of a running mesh",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connect", "--endpoint", dest="endpoint", default=None,
                   help="client endpoint (default: $EXEGPT_COORDINATOR_ENDPOINT, else "
                        "tcp://127.0.0.1:5555, where `exegpt up` serves)")
    p.add_argument("--plan", type=Path, default=None,
                   help="plan JSON to compare with (default: the plan the coordinator reports)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--requests", action="store_true",
                   help="also fetch the recent requests' lifecycle timestamps (--json: all of "
                        "them; tables: the last few)")
    p.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="SECONDS",
                   help="refresh every SECONDS (default 2) until Ctrl-C")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for an answer")
    add_curve_args(p)
    p.set_defaults(func=run)


def resolve_endpoint(endpoint: str | None) -> str:
    from common.sockets import ENV_COORDINATOR_ENDPOINT

    return endpoint or os.environ.get(ENV_COORDINATOR_ENDPOINT) or "tcp://127.0.0.1:5555"


def load_plan(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    from coordinator.metrics import load_plan as read_plan

    return read_plan(path)


def run(args: argparse.Namespace) -> int:
    try:
        if args.watch is not None and not args.watch > 0:
            raise ValueError(f"--watch needs a positive interval, got {args.watch}")
        plan = load_plan(args.plan)
        endpoint = resolve_endpoint(args.endpoint)
        apply_curve_args(args)
    except ValueError as exc:
        print(f"exegpt stats: {exc}", file=sys.stderr)
        return 2
    try:
        return _loop(args, endpoint, plan)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `exegpt stats --watch | head`: the reader left; so do we
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _loop(args: argparse.Namespace, endpoint: str, plan: dict[str, Any] | None) -> int:
    from rich.console import Console

    from common.errors import ExegptError
    from coordinator.commands._stats_view import fetch_stats, interval_rates, render, summarize

    console = Console() if sys.stdout.isatty() else Console(width=WIDTH_WHEN_PIPED)
    before: tuple[float, dict[str, Any]] | None = None
    while True:
        try:
            summary = summarize(fetch_stats(endpoint, args.timeout, args.requests), plan)
        except ExegptError as exc:
            print(f"exegpt stats: no answer from {endpoint} ({exc}); is a mesh serving "
                  "there (`exegpt up`, `exegpt serve`)?", file=sys.stderr)
            return 1
        now, counters = time.monotonic(), summary.get("requests") or {}
        rates = None if before is None else interval_rates(before[1], counters, now - before[0])
        before = (now, counters)
        if args.json:
            if rates:
                summary["interval"] = rates
            print(json.dumps(summary, indent=None if args.watch else 1, default=str),
                  flush=True)
        else:
            if args.watch:
                console.clear()
            console.print(f"{endpoint}   {time.strftime('%H:%M:%S')}")
            console.print(render(summary, rates))
        if args.watch is None:
            return 0
        time.sleep(args.watch)
