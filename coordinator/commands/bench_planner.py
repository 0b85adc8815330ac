"""`exegpt bench planner`: search time per (workload, bound), B&B vs exhaustive, closed form vs DES.

Scenarios: the paper's five tasks x the paper's bounds (static baseline's 10/30/70th latency
percentiles, plus no bound) for one model on an analytic GPU cluster (default OPT-13B on 4 A40).
Exhaustive search (the reference) is slow, so it runs on ``--exhaustive-tasks`` only.
``--profile`` takes a measured profile instead (e.g. SmolLM2 on this CPU, whose throughput is
not monotone in the batch: the search then uses its non-monotone bounds, docs/planner.md),
``--workload`` a workload spec instead of the paper's tasks (named ``W``: pass
``--exhaustive-tasks W`` to compare), ``--policies`` the policies searched.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("planner", help="planner search time and accuracy",
                              description=__doc__)
    p.add_argument("--model", default="opt-13b")
    p.add_argument("--gpu", default="a40", choices=["a40", "a100", "h100"])
    p.add_argument("--gpus", type=int, default=4)
    p.add_argument("--profile", default=None,
                   help="a profile JSON or analytic:GPU:MODEL (default: --gpu/--model analytic)")
    p.add_argument("--workload", default=None,
                   help="one workload spec instead of --tasks (task name W)")
    p.add_argument("--policies", default="rra,waa-c,waa-m")
    p.add_argument("--tasks", default="S,T,G,C1,C2")
    p.add_argument("--exhaustive-tasks", default="S", help="tasks also searched exhaustively "
                                                           "('' for none)")
    p.add_argument("--repeats", type=int, default=3, help="B&B timing repeats (median)")
    p.add_argument("--des-requests", type=int, default=12000,
                   help="requests per discrete-event check of the chosen plan (0: skip)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from common.models.config import ModelConfig
    from coordinator.planner.analytic import analytic_profile, parse_profile_arg
    from coordinator.planner.candidate import WorkloadStats
    from coordinator.planner.costs import Costs
    from coordinator.planner.des import run_des
    from coordinator.planner.scheduler import search
    from coordinator.planner.sweep import paper_bounds
    from coordinator.planner.workload import parse_workload, preset

    if args.profile:
        costs = Costs(parse_profile_arg(args.profile))
        where = f"{args.profile} on {args.gpus} workers"
    else:
        costs = Costs(analytic_profile(args.gpu, ModelConfig.preset(args.model)))
        where = f"{args.model} on {args.gpus} x {args.gpu} (analytic)"
    policies = tuple(p for p in args.policies.split(",") if p)
    tasks = {"W": parse_workload(args.workload)} if args.workload else {
        t: preset(t) for t in args.tasks.split(",")}
    exh_tasks = {t for t in args.exhaustive_tasks.split(",") if t}
    print(f"{where}; policies {', '.join(policies)}; "
          "machine shared with other jobs: times are medians of cold searches")
    print("| task | bound (s) | B&B wall s (cpu s) | evals | exhaustive s | evals | B&B/exh thr | "
          "DES/closed thr | DES/closed p99-len lat |")
    print("|---|---|---|---|---|---|---|---|---|")
    bnb_times, bnb_cpu, gaps, des_thr, des_lat, evals = [], [], [], [], [], []
    for task, wl in tasks.items():
        stats = WorkloadStats(wl)
        for bound in paper_bounds(stats, costs, args.gpus):
            b = bound if math.isfinite(bound) else 1e18
            times, cpu, res = [], [], None
            for _ in range(args.repeats):
                # cold: fresh tables and memos, as a single `exegpt plan` call sees them
                cold_costs, cold_stats = Costs(costs.profile), WorkloadStats(wl)
                t0, c0 = time.perf_counter(), time.process_time()
                res = search(cold_stats, cold_costs, args.gpus, b, policies=policies)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            assert res is not None
            med, med_cpu = statistics.median(times), statistics.median(cpu)
            bnb_times.append(med)
            bnb_cpu.append(med_cpu)
            evals.append(res.evaluated)
            row = [task, "inf" if not math.isfinite(bound) else f"{bound:.2f}",
                   f"{med:.3f} ({med_cpu:.3f})", str(res.evaluated)]
            if task in exh_tasks:
                ex = search(WorkloadStats(wl), Costs(costs.profile), args.gpus, b,
                            policies=policies, use_exhaustive=True)
                ratio = _ratio(res, ex)
                gaps.append(ratio)
                row += [f"{ex.seconds:.1f}", str(ex.evaluated), f"{ratio:.4f}"]
            else:
                row += ["-", "-", "-"]
            if args.des_requests <= 0:
                row += ["-", "-"]
            elif res.best is not None:
                cand, m = res.best
                d = run_des(cand, wl, costs, num_requests=args.des_requests, seed=0).metrics
                des_thr.append(d.throughput_seq_s / m.throughput_seq_s)
                des_lat.append(d.latency_p99len_s / m.latency_p99len_s)
                row += [f"{des_thr[-1]:.4f}", f"{des_lat[-1]:.4f}"]
            else:
                row += ["infeasible", "-"]
            print("| " + " | ".join(row) + " |", flush=True)
    print(f"\nB&B search time: wall median {statistics.median(bnb_times):.3f} s, max "
          f"{max(bnb_times):.3f} s; cpu median {statistics.median(bnb_cpu):.3f} s, max "
          f"{max(bnb_cpu):.3f} s over {len(bnb_times)} scenarios; evaluations median "
          f"{statistics.median(evals):.0f}, max {max(evals)}")
    if gaps:
        print(f"B&B / exhaustive throughput: min {min(gaps):.4f} over {len(gaps)} scenarios")
    if des_thr:
        worst_t = max(abs(x - 1) for x in des_thr)
        worst_l = max(abs(x - 1) for x in des_lat)
        print(f"closed form vs DES: worst throughput gap {worst_t:.2%}, worst p99-length "
              f"latency gap {worst_l:.2%}")
    return 0


def _ratio(bnb, ex) -> float:  # noqa: ANN001
    if ex.best is None:
        return 1.0 if bnb.best is None else float("nan")
    if bnb.best is None:
        return 0.0
    return bnb.best[1].throughput_seq_s / ex.best[1].throughput_seq_s
