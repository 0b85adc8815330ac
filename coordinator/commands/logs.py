"""`exegpt logs`: merge a run's per-process JSON logs in time order, or follow them live."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "logs",
        help="show or follow the logs of a run (all processes merged in time order)",
        description="Merge runs/<run>/*.jsonl in time order; -f follows like "
        "`docker-compose logs -f`.",
    )
    p.add_argument("--run", help="run id or run directory (default: the latest run)")
    p.add_argument("--runs-dir", help="where runs live (default: $EXEGPT_RUNS_DIR or ./runs)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("--role", action="append", default=[], help="only this role (repeatable)")
    p.add_argument("--worker", action="append", default=[], help="only this worker id")
    p.add_argument("--req", help="only lines about this req_id")
    p.add_argument("--level", default="debug", help="minimum level (debug, info, warning, error)")
    p.add_argument("--json", action="store_true", help="print raw JSON lines")
    p.add_argument("--no-color", action="store_true", help="plain text even on a terminal")
    p.set_defaults(func=run)


def _resolve_run(run: str | None, runs_dir: str | None) -> Path:
    from common.logs import latest_run
    from common.logs import runs_dir as default_runs_dir

    root = default_runs_dir(runs_dir)
    if run is None:
        return latest_run(root)
    for candidate in (Path(run), root / run):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"run {run!r} not found (looked in {root}); see `ls {root}`")


def run(args: argparse.Namespace) -> int:
    import json

    from common.logs import LogFilter, follow_events, format_event, merged_events

    try:
        run_dir = _resolve_run(args.run, args.runs_dir)
        flt = LogFilter(tuple(args.role), tuple(args.worker), args.req, args.level.lower())
    except (FileNotFoundError, ValueError) as exc:
        print(f"exegpt logs: {exc}", file=sys.stderr)
        return 2
    color = sys.stdout.isatty() and not args.no_color and not args.json
    events = follow_events(run_dir, flt) if args.follow else merged_events(run_dir, flt)
    width = max((len(p.stem) for p in run_dir.glob("*.jsonl")), default=0)
    try:
        for event in events:
            line = json.dumps(event, ensure_ascii=False) if args.json else format_event(
                event, color=color, width=width
            )
            print(line, flush=args.follow)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `exegpt logs | head`
        sys.stderr.close()
        return 0
    return 0
