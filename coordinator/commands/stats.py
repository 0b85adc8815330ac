"""`exegpt stats`: how a running mesh is doing, per worker and overall, against its plan.

    exegpt stats                                  # EXEGPT_COORDINATOR_ENDPOINT or 127.0.0.1:5555
    exegpt stats --endpoint tcp://host:5555 --plan runs/up-plan.json
    exegpt stats --json                           # one JSON object (--watch: one per line)
    exegpt stats --watch 2                        # refresh every 2 s until Ctrl-C

Asks the coordinator with a StatsRequest through the SDK (common/client.py): throughput,
latency percentiles, TTFT, time per token, encode/decode batch sizes over time, B_E
adjustments, KV bytes moved, next to the plan's predictions (from the coordinator, or from
--plan). Exit status: 0 ok, 1 the coordinator did not answer, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("stats", help="throughput/latency/batching of a running mesh",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoint", default=None,
                   help="client endpoint (default: $EXEGPT_COORDINATOR_ENDPOINT, else "
                        "tcp://127.0.0.1:5555, where `exegpt up` serves)")
    p.add_argument("--plan", type=Path, default=None,
                   help="plan JSON to compare with (default: the plan the coordinator reports)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="SECONDS",
                   help="refresh every SECONDS (default 2) until Ctrl-C")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for an answer")
    p.set_defaults(func=run)


def resolve_endpoint(endpoint: str | None) -> str:
    from common.sockets import ENV_COORDINATOR_ENDPOINT

    return endpoint or os.environ.get(ENV_COORDINATOR_ENDPOINT) or "tcp://127.0.0.1:5555"


def load_plan(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    from coordinator.planner.plan import Plan

    try:
        return Plan.from_json(path.read_text()).to_dict()
    except OSError as exc:
        raise ValueError(f"cannot read plan {path}: {exc.strerror}") from exc
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a plan JSON (`exegpt plan --out`): {exc}") from exc


def run(args: argparse.Namespace) -> int:
    from common.errors import ExegptError
    from coordinator.commands._stats_view import (
        fetch_stats,
        interval_rates,
        render_summary,
        summarize,
    )

    try:
        if args.watch is not None and not args.watch > 0:
            raise ValueError(f"--watch needs a positive interval, got {args.watch}")
        plan = load_plan(args.plan)
        endpoint = resolve_endpoint(args.endpoint)
    except ValueError as exc:
        print(f"exegpt stats: {exc}", file=sys.stderr)
        return 2
    before: tuple[float, dict[str, Any]] | None = None
    try:
        while True:
            try:
                summary = summarize(fetch_stats(endpoint, args.timeout), plan)
                now = time.monotonic()
                if before is not None:  # --watch: rates over the last interval
                    summary["interval"] = interval_rates(before[1], summary["counters"],
                                                         now - before[0])
                before = (now, summary["counters"])
            except ExegptError as exc:
                print(f"exegpt stats: no answer from {endpoint} ({exc}); is a mesh serving "
                      "there (`exegpt up`, `exegpt serve`)?", file=sys.stderr)
                return 1
            if args.json:
                print(json.dumps(summary, indent=None if args.watch else 1, default=str),
                      flush=True)
            else:
                if args.watch:
                    print("\x1b[2J\x1b[H", end="")
                print(f"{endpoint}   {time.strftime('%H:%M:%S')}")
                print(render_summary(summary), flush=True)
            if args.watch is None:
                return 0
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `exegpt stats --watch | head`: the reader left; so do we
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
