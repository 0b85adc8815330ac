"""`exegpt bench` (no target; also `exegpt bench eval`): exegpt vs static and continuous
batching on the real mesh, under the same latency bounds, predicted beside measured.

    exegpt bench --quick                                   a few minutes: SmolLM2, task S
    exegpt bench --model M.gguf --workload S --workers 2 --bounds auto --requests 48 \\
                 --policies exegpt,static,continuous --repeats 1 --out bench-out

For each bound (``auto``: the static baseline measured over batch sizes, bottom 10/30/70% of
its latencies plus no bound; ``predicted``: the planner's static latencies instead; or seconds
``L1,L2,inf``) and each policy: plan with this machine's profile for at most K // 2 requests
in flight (``--max-in-flight``; 0: no cap), run the plan on local worker
processes, send the same K seeded requests (output lengths enforced by ignoring EOS unless
``--natural-eos``), and record throughput, p99-length latency, p99, TTFT and time per token
beside the plan's predictions. Writes DIR/results.json, DIR/results.md, PNG plots, and every
run's request lifecycles in DIR/runs/. See docs/bench.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

QUICK = {"workload": "in=normal:64,63,128;out=normal:32,13,80;name=S/4", "requests": 12,
         "bounds": "auto", "bound_batches": (1, 2)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="a .gguf file, HF model directory or preset "
                   "(default: the embedded SmolLM2-135M GGUF); with --null-model a preset")
    p.add_argument("--null-model", action="store_true",
                   help="run the mesh with the null model (no math; tests the machinery)")
    p.add_argument("--workload", default=None,
                   help="paper task (S, T, G, C1, C2) or spec (`exegpt plan --help`); default "
                        f"S (--quick: {QUICK['workload']})")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--bounds", default=None,
                   help="auto | predicted | seconds L1,L2,...,inf (default auto; --quick: "
                        "auto over static batches 1 and 2)")
    p.add_argument("--requests", type=int, default=None,
                   help="K requests per run (default 48; --quick: 12)")
    p.add_argument("--policies", default="exegpt,static,continuous",
                   help="comma-separated: exegpt, static, continuous, rra, waa")
    p.add_argument("--repeats", type=int, default=1, help="runs per plan (median reported)")
    p.add_argument("--max-in-flight", type=int, default=None, metavar="N",
                   help="plan every policy for at most N requests in flight (default K // 2, "
                        "so K requests fill every plan twice; 0: no cap)")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="output directory")
    p.add_argument("--quick", action="store_true",
                   help="the short version: task S with inputs / 4, 12 requests, bounds from "
                        "static batches 1 and 2, a quick profile if none is cached")
    p.add_argument("--natural-eos", action="store_true",
                   help="stop at the model's EOS (default: ignore EOS up to the drawn length)")
    p.add_argument("--seed", type=int, default=0, help="seed of the request draw")
    p.add_argument("--profile", default=None,
                   help="plan from this profile JSON, analytic:GPU:MODEL or analytic:GPU "
                        "(the served model's shape) (default: this machine's cached profile, "
                        "measured on first use)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--bound-batches", default="",
                   help="static batch sizes measured for --bounds auto (default: powers of 2 "
                        "the request count can fill)")
    p.add_argument("--no-calibrate", action="store_true",
                   help="plan from the profile as measured (CPU time per layer) instead of "
                        "scaled by the wall/CPU factor the --bounds auto baseline runs measure")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the transformers `generate` reference")
    p.add_argument("--reference-batch", type=int, default=8,
                   help="static batch size of the transformers reference (default 8)")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--reanalyse", type=Path, default=None, metavar="DIR",
                   help="run nothing: recompute DIR's figures, errors, elasticities, tables "
                        "and plots from the lifecycles and plans it recorded")
    p.add_argument("--repredict", action="store_true",
                   help="with --reanalyse: predict the recorded plans again with today's "
                        "planner and calibration (refitted from the recorded baseline runs); "
                        "the run's own predictions are kept as predicted_at_run")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("eval", help="exegpt vs static/continuous on the mesh (default)",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def register_default(bench: argparse.ArgumentParser) -> None:
    """The bare `exegpt bench [flags]` runs the evaluation."""
    add_arguments(bench)
    bench.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> Any:
    from coordinator.bench.config import (
        DEFAULT_REQUESTS,
        BenchConfig,
        parse_bounds,
        parse_policies,
    )

    bounds = parse_bounds(args.bounds or (QUICK["bounds"] if args.quick else "auto"))
    policies = parse_policies(args.policies)
    model = args.model
    if model is None:
        if args.null_model:
            model = "smollm2-135m"
        else:
            from common.models.gguf_loader import default_gguf_path

            model = str(default_gguf_path())
    quick = bool(args.quick)
    batches = tuple(int(x) for x in args.bound_batches.split(",") if x.strip())
    if quick and not batches and not args.bounds:
        batches = QUICK["bound_batches"]
    return BenchConfig(
        model=model, workload=args.workload or (QUICK["workload"] if quick else "S"),
        workers=args.workers,
        bounds=bounds,
        requests=args.requests or (QUICK["requests"] if quick else DEFAULT_REQUESTS),
        policies=policies, repeats=args.repeats, out=args.out,
        quick=quick, natural_eos=args.natural_eos, seed=args.seed, null_model=args.null_model,
        profile=args.profile, dtype=args.dtype, bound_batches=batches,
        reference=not args.no_reference, reference_batch=args.reference_batch,
        calibrate=not args.no_calibrate,
        startup_timeout_s=args.startup_timeout, max_in_flight=args.max_in_flight)


def run(args: argparse.Namespace) -> int:
    from common.procs import StartupError
    from coordinator.bench.evaluate import Evaluation
    from coordinator.bench.progress import Progress

    if args.reanalyse is not None:
        return _reanalyse(args.reanalyse, args.repredict)
    if args.repredict:
        print("exegpt bench: --repredict goes with --reanalyse DIR", file=sys.stderr)
        return 2
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"exegpt bench: {exc}", file=sys.stderr)
        return 2
    try:
        with Progress(enabled=not args.no_progress) as progress:
            results = Evaluation(cfg, progress).run()
    except (ValueError, FileNotFoundError) as exc:
        print(f"exegpt bench: {exc}", file=sys.stderr)
        return 2
    except (StartupError, RuntimeError, TimeoutError, OSError) as exc:
        print(f"exegpt bench: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return _write(results, cfg.out)


def _write(results: dict[str, Any], out: Path) -> int:
    from coordinator.bench import plots, report

    json_path, md_path = report.write(results, out)
    pngs = plots.write_all(results, out)
    print(md_path.read_text())
    print(f"exegpt bench: wrote {json_path}, {md_path}, "
          + ", ".join(str(p) for p in pngs), flush=True)
    return 0


def _reanalyse(out: Path, repredict: bool) -> int:
    from coordinator.bench.reanalyse import reanalyse

    try:
        results = reanalyse(out, repredict=repredict)
    except (ValueError, OSError, KeyError) as exc:
        print(f"exegpt bench --reanalyse: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return _write(results, out)
