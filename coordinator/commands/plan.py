"""`exegpt plan`: the highest-throughput schedule under a latency bound (pure planner, no torch).

Examples:
    exegpt plan --profile analytic:a40:opt-13b --workload S --latency-bound 5.9 --gpus 4
    exegpt plan --profile profile.json --workload trace.jsonl --latency-bound 2 --workers 2 --json
    exegpt plan --profile analytic:a40:opt-13b --workload S --gpus 4 --sweep --sweep-png s.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plan", help="pick the highest-throughput schedule under a bound",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default=None,
                   help="profile JSON, or analytic:GPU:MODEL[:DTYPE] (GPU: a40, a100, h100)")
    p.add_argument("--workload", required=True,
                   help="preset S|T|G|C1|C2, inline 'in=normal:256,252,512;out=normal:32,13,80"
                        "[;rate=R]', a .jsonl/.csv trace, or 'observed' (with --connect: what "
                        "a coordinator running --adapt sees, beside its plan's law)")
    p.add_argument("--connect", default=None,
                   help="with --workload observed: the coordinator's client endpoint")
    p.add_argument("--latency-bound", type=float, default=None,
                   help="seconds (inf = no bound); required unless --sweep")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--workers", type=int, help="number of worker processes")
    size.add_argument("--gpus", type=int, help="synonym of --workers for analytic GPU clusters")
    p.add_argument("--policy", default="auto",
                   choices=["auto", "rra", "waa", "waa-c", "waa-m", "static", "continuous", "all"])
    p.add_argument("--sla", default="b", choices=["a", "b"],
                   help="b: p99-length request (the paper's); a: 99%% of all requests")
    p.add_argument("--tokenizer", help="tokenizer.json to count tokens of trace prompts")
    p.add_argument("--model", help="model preset the profile must be for (checked)")
    p.add_argument("--dtype", help="dtype the profile must be for (checked)")
    p.add_argument("--memory-gb", type=float, help="override a worker's memory (GB)")
    p.add_argument("--exhaustive", action="store_true", help="enumerate instead of B&B")
    p.add_argument("--max-in-flight", type=int, default=None, metavar="N",
                   help="only plans holding at most N requests in flight (a concurrency cap, "
                        "like vLLM's max_num_seqs; 0 or unset: no cap)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--out", help="write the plan JSON here")
    p.add_argument("--sweep", action="store_true",
                   help="throughput vs bound per policy (bounds the paper's way unless --bounds)")
    p.add_argument("--bounds", help="comma-separated bounds for --sweep (inf allowed)")
    p.add_argument("--sweep-png", default="plan-sweep.png", help="figure written by --sweep")
    p.add_argument("--timeline", help="draw the chosen schedule's per-worker timeline (PNG)")
    p.add_argument("--seed", type=int, default=0, help="seed of the timeline's simulation")
    p.set_defaults(func=run)


def _load(args: argparse.Namespace):  # noqa: ANN202
    from common.models.config import ModelConfig
    from coordinator.planner.analytic import parse_profile_arg
    from coordinator.planner.workload import parse_workload

    profile = parse_profile_arg(args.profile, args.dtype)
    profile.check_compatible(ModelConfig.preset(args.model) if args.model else None, args.dtype)
    if args.memory_gb is not None:
        profile.meta["memory_bytes"] = args.memory_gb * 1e9
    tokenize = None
    if args.tokenizer:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(args.tokenizer)
        tokenize = lambda text: tok.encode(text).ids  # noqa: E731
    return profile, parse_workload(args.workload, tokenize)


def run(args: argparse.Namespace) -> int:
    if args.workload == "observed":
        from coordinator.commands._observed import run_observed

        return run_observed(args)
    return planner_errors(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    workers = args.workers if args.workers is not None else args.gpus
    if args.profile is None or workers is None:
        raise ValueError("--profile and --workers (or --gpus) are required")
    profile, workload = _load(args)
    if args.sweep:
        return _sweep(args, profile, workload, workers)
    if args.latency_bound is None:
        raise ValueError("--latency-bound is required (use inf for no bound)")
    plan = plan_from_args(args, workload, profile, workers)
    print(plan.to_json() if args.json else render(plan) + "\n" + sensitivity(plan, workload,
                                                                             profile))
    if args.timeline:
        _timeline(args, plan, workload, profile)
    return 0


def planner_errors(body: Callable[[], int]) -> int:
    """``body``'s exit code, or the planner's refusals said on stderr as one: 2 when no schedule
    meets the bound, 1 for bad input. Shared with ``--workload observed`` so both answer
    alike."""
    from coordinator.planner.scheduler import InfeasibleBound

    try:
        return body()
    except InfeasibleBound as exc:
        print(f"exegpt plan: infeasible: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"exegpt plan: {exc}", file=sys.stderr)
        return 1


def plan_from_args(args: argparse.Namespace, workload, profile, workers: int):  # noqa: ANN001, ANN201
    """The plan for ``args``' bound (inf = none), policy and SLA, saved to ``--out``."""
    from coordinator.planner.planning import make_plan

    bound = args.latency_bound if math.isfinite(args.latency_bound) else 1e18
    plan = make_plan(workload, profile, workers, bound, policy=args.policy, sla=args.sla,
                     exhaustive=args.exhaustive, max_in_flight=in_flight_cap(args))
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(plan.to_json())
    return plan


def in_flight_cap(args: argparse.Namespace) -> int | None:
    """``--max-in-flight`` as the planner's ``max_in_flight`` (0 or unset: None, no cap)."""
    cap = getattr(args, "max_in_flight", None)
    if cap is not None and cap < 0:
        raise ValueError(f"--max-in-flight must be >= 0 (0: no cap), got {cap}")
    return cap or None


def render(plan) -> str:  # noqa: ANN001
    """The plan as a readable table."""
    pr = plan.predicted
    knobs = [f"B_E={plan.B_E}", f"B_D={plan.B_D:.1f}"]
    if plan.N_D is not None:
        knobs.append(f"N_D={plan.N_D}")
    if plan.B_m is not None:
        knobs.append(f"B_m={plan.B_m}")
    lines = [
        f"policy            {plan.policy}   ({', '.join(knobs)}, microbatches={plan.microbatches})",
        f"model / workload  {plan.model.get('name') or plan.model['family']} / "
        f"{plan.workload_info.get('description', plan.workload)}",
        f"latency bound     {plan.latency_bound_s:g} s (SLA-({plan.sla}))",
        f"in flight         {_in_flight(plan)}",
        f"throughput        {pr['throughput_seq_s']:.3f} seq/s, {pr['throughput_tok_s']:.1f} tok/s",
        f"latency           p99-length {pr['latency_p99len_s']:.3f} s, p99 "
        f"{pr['latency_p99_s']:.3f} s, TTFT {pr['ttft_s']:.3f} s, TPOT {pr['tpot_s']*1e3:.1f} ms",
        "worker groups     role      workers  tp  decoder layers  encoder layers",
    ]
    for g in plan.worker_groups:
        enc = f"{g.encoder_layer_range[0]}-{g.encoder_layer_range[1]}" \
            if g.encoder_layer_range else "-"
        lines.append(f"                  {g.role:<9} {g.count:>7} {g.tp_size:>3}  "
                     f"{g.layer_range[0]:>5}-{g.layer_range[1]:<8} {enc}")
    util = ", ".join(f"{u:.0%}" for u in pr["worker_util"])
    mem = ", ".join(f"{m / 1e9:.1f}" for m in pr["worker_mem_bytes"])
    lines += [f"utilisation       {util}",
              f"memory (GB)       {mem}  (usable {pr['mem_capacity_bytes'] / 1e9:.1f})",
              f"search            {plan.search.get('method')}: "
              f"{plan.search.get('candidates_evaluated')} candidates in "
              f"{plan.search.get('seconds', 0):.2f} s",
              f"profile           {plan.profile_meta.get('source')} on "
              f"{plan.profile_meta.get('device')} ({plan.profile_meta.get('dtype')})"]
    return "\n".join(lines)


def sensitivity(plan, workload, profile) -> str:  # noqa: ANN001
    """How far a 5% error of the profile's decode or encode cost moves the prediction
    (coordinator/bench/sensitivity.py), with a warning when it is amplified."""
    from coordinator.bench.sensitivity import STEP, elasticities, well_conditioned, worst

    e = elasticities(plan, workload, profile)
    parts = "; ".join(
        f"{part} cost: latency {_f(v['latency_p99len_s'])}, throughput "
        f"{_f(v['throughput_seq_s'])}" for part, v in e.items())
    line = f"elasticity        {parts}"
    if well_conditioned(e) is False:
        moved = (math.exp(math.log1p(STEP) * (worst(e, 'latency_p99len_s') or 0.0)) - 1.0)
        line += (f"\n                  ill-conditioned: a {STEP:.0%} profile error moves the "
                 f"p99-length latency by ~{moved:.0%} (a regime boundary, e.g. the encoders "
                 "feeding the decoders near capacity)")
    return line


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:+.2f}"


def _in_flight(plan) -> str:  # noqa: ANN001
    """Requests the plan holds in flight, and the cap it was planned under."""
    from coordinator.planner.inflight import plan_in_flight

    cap = plan.search.get("max_in_flight")
    return (f"{plan_in_flight(plan):.1f} requests"
            + (f" (cap {cap})" if cap else " (no cap)"))


def _sweep(args: argparse.Namespace, profile, workload, workers: int) -> int:  # noqa: ANN001
    from coordinator.planner.candidate import WorkloadStats
    from coordinator.planner.costs import Costs
    from coordinator.planner.plots import plot_sweep
    from coordinator.planner.sweep import SWEEP_POLICIES, paper_bounds, sweep, sweep_table

    stats, costs = WorkloadStats(workload), Costs(profile)
    if args.bounds:
        bounds = [float(b) for b in args.bounds.split(",")]
    else:
        bounds = paper_bounds(stats, costs, workers, args.sla)
    pols = SWEEP_POLICIES if args.policy in ("auto", "all") else tuple(
        __import__("coordinator.planner.planning", fromlist=["x"]).policies_for(args.policy))
    points = sweep(stats, costs, workers, bounds, policies=pols, sla=args.sla,
                   exhaustive=args.exhaustive, max_in_flight=in_flight_cap(args))
    if args.json:
        print(json.dumps([{"bound": p.bound if math.isfinite(p.bound) else None,
                           "policy": p.policy,
                           "throughput_seq_s": p.best[1].throughput_seq_s if p.best else None,
                           "latency_s": p.best[1].latency(args.sla) if p.best else None}
                          for p in points], indent=1))
    else:
        print(sweep_table(points, args.sla))
    path = plot_sweep(points, args.sweep_png, f"{workload.name} on {workers} workers "
                      f"({profile.meta['source']})")
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _timeline(args: argparse.Namespace, plan, workload, profile) -> None:  # noqa: ANN001
    from coordinator.planner.candidate import Candidate
    from coordinator.planner.costs import Costs
    from coordinator.planner.des import run_des
    from coordinator.planner.plots import plot_timeline

    cand = Candidate(plan.policy, plan.num_workers, plan.search["tp"],
                     plan.search["num_tp_workers"], plan.B_E, plan.N_D or 1, plan.B_m or 1)
    for num in (3000, 12000, 48000):  # long-lived requests need a longer run to settle
        try:
            result = run_des(cand, workload.with_arrival(None), Costs(profile),
                             num_requests=num, seed=args.seed, record_timeline=True)
            break
        except ValueError:
            if num == 48000:
                raise
    pr = plan.predicted
    span = (1.5 * pr["cycle_s"] if "cycle_s" in pr
            else 8 * pr.get("round_s", pr.get("iteration_s", pr["tpot_s"])))
    title = f"{plan.policy} on {plan.num_workers} workers: {workload.name}"
    path = plot_timeline(result, args.timeline, span_s=span, title=title)
    print(f"wrote {path}", file=sys.stderr)
