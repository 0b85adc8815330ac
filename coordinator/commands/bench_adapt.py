"""`exegpt bench adapt`: the cost and the gain of adapting the plan to a workload shift.

The traffic shifts from an S-like law (summarisation: long inputs, short outputs; the paper's
task S scaled by 1/4) to a T-like one (translation: outputs 4x longer) on a null-model RRA
mesh of two stage workers whose per-pass sleeps stand in for SmolLM2-135M on a 2-core CPU.
Three arms (coordinator/commands/_adapt_bench.py): --adapt on, the old plan kept, and a
stop + restart with the new law's plan at the shift. Printed and written to --out:
bench-adapt.json (every number, the series), bench-adapt.md (the tables), bench-adapt.png,
bench-adapt-records.json (every request's times, the switches).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("adapt", help="adapt vs keep vs restart across a workload shift",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default="adapt,keep,restart", help="which arms, comma-separated")
    p.add_argument("--before-s", type=float, default=40.0, help="old-law traffic (seconds)")
    p.add_argument("--after-s", type=float, default=100.0, help="new-law traffic (seconds)")
    p.add_argument("--latency-bound", type=float, default=8.0,
                   help="latency bound (s) both plans are made for")
    p.add_argument("--concurrency", type=int, default=160, help="requests kept in flight")
    p.add_argument("--decode-ms", type=float, default=25.0,
                   help="null decode sleep per stage pass (2 stages: 50 ms a step)")
    p.add_argument("--encode-ms", type=float, default=5.0, help="null encode sleep per pass")
    p.add_argument("--encode-ms-per-token", type=float, default=1.5,
                   help="... plus this per prompt token, per stage")
    p.add_argument("--old", default=None, help="workload spec before the shift")
    p.add_argument("--new", default=None, help="workload spec after the shift")
    p.add_argument("--adapt-options", default="", help="the adapter's thresholds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--served-layers", default="0:10,10:30",
                   help="the old plan's stage layer ranges as served (the planner splits "
                        "evenly, so the adapt arm's re-plan re-lays them out live); '' = the "
                        "planner's own split (knob-only switches)")
    p.add_argument("--out", type=Path, default=Path("runs/bench-adapt"))
    p.add_argument("--reanalyse", action="store_true",
                   help="no runs: rebuild the numbers and plot from --out's saved records "
                        "(pass the same scenario flags)")
    p.set_defaults(func=run)


def config(args: argparse.Namespace) -> Any:
    from coordinator.commands._adapt_bench import BenchConfig
    from coordinator.commands._null_profile import NullCosts

    base = BenchConfig()
    return BenchConfig(NullCosts(args.decode_ms, args.encode_ms, args.encode_ms_per_token),
                       old=args.old or base.old, new=args.new or base.new,
                       bound_s=args.latency_bound, before_s=args.before_s, after_s=args.after_s,
                       concurrency=args.concurrency, adapt_options=args.adapt_options,
                       seed=args.seed, served_layers=args.served_layers)


def bench(cfg: Any, arms: list[str], out: Path, say: Any = print) -> dict[str, Any]:
    """Plan, run each arm, summarise; write JSON, markdown and the plot into ``out``."""
    from coordinator.commands._adapt_bench import knobs_of, make_plans, predict, run_arm

    old, new, profile = make_plans(cfg, out)
    plans = {"old": knobs_of(old), "new": knobs_of(new),
             "old_on_new_law": predict(old, cfg.new, profile)}  # the keep arm's promise
    say(f"plans (bound {cfg.bound_s:g} s): old {plans['old']}, new {plans['new']}")
    runs = {}
    for arm in arms:
        start = time.perf_counter()
        runs[arm] = run_arm(arm, cfg, out, profile)
        say(f"arm {arm}: {len(runs[arm].records)} requests in {time.perf_counter() - start:.0f} s")
    return report(runs, cfg, plans, out, say)


def report(runs: dict[str, Any], cfg: Any, plans: dict[str, Any], out: Path,
           say: Any = print) -> dict[str, Any]:
    from coordinator.commands._adapt_bench_report import markdown, plot, summarize

    summary = summarize(runs, cfg, plans)
    (out / "bench-adapt.json").write_text(json.dumps(summary, indent=1))
    (out / "bench-adapt-records.json").write_text(json.dumps(  # every request, to re-analyse
        {name: {"t0": r.t0, "t_shift": r.t_shift, "t_end": r.t_end, "records": r.records,
                "switches": r.switches, "restart": r.restart} for name, r in runs.items()}))
    table = markdown(summary)
    (out / "bench-adapt.md").write_text(table + "\n")
    plot(summary, str(out / "bench-adapt.png"))
    say(table)
    return summary


def run(args: argparse.Namespace) -> int:
    from coordinator.commands._adapt_bench import ARMS

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        print(f"exegpt bench adapt: --arms takes {', '.join(ARMS)}", file=sys.stderr)
        return 2
    try:
        cfg = config(args)
    except ValueError as exc:
        print(f"exegpt bench adapt: {exc}", file=sys.stderr)
        return 2
    if args.reanalyse:
        reanalyse(cfg, args.out)
    else:
        bench(cfg, arms, args.out)
    print(f"written: {args.out}/bench-adapt.json, .md, .png")
    return 0


def reanalyse(cfg: Any, out: Path) -> dict[str, Any]:
    """The report again from bench-adapt-records.json (e.g. after changing the analysis)."""
    from coordinator.commands._adapt_bench import ArmRun

    saved = json.loads((out / "bench-adapt-records.json").read_text())
    plans = json.loads((out / "bench-adapt.json").read_text())["plans"]
    if "old_on_new_law" not in plans:  # a report written before this number existed
        from coordinator.commands._adapt_bench import predict
        from coordinator.planner.plan import Plan

        old = Plan.from_json((out / "plan-old.json").read_text())
        plans["old_on_new_law"] = predict(old, cfg.new, str(out / "null-profile.json"))
    runs = {name: ArmRun(name, r["records"], r["t0"], r["t_shift"], r["t_end"],
                         sum(rec["law"] == "old" for rec in r["records"]), r["switches"],
                         r["restart"]) for name, r in saved.items()}
    return report(runs, cfg, plans, out)
