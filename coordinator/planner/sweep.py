"""Throughput against the latency bound, per policy: the paper's evaluation, as a library call.

Bounds "the paper's way": run the static-batching baseline over batch sizes in steps of 4 (every
TP layout), and take the 10th, 30th and 70th percentiles of its latencies, plus no bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from coordinator.planner.candidate import Candidate, Metrics, WorkloadStats
from coordinator.planner.costs import Costs
from coordinator.planner.scheduler import search
from coordinator.planner.simulator import simulate

SWEEP_POLICIES = ("rra", "waa-c", "waa-m", "static", "continuous")


def paper_bounds(stats: WorkloadStats, costs: Costs, num_workers: int, sla: str = "b",
                 max_batch: int = 512) -> list[float]:
    lats: list[float] = []
    for tp in [t for t in costs.profile.tp_sizes if t <= num_workers]:
        for k in ([0] if tp == 1 else range(tp, num_workers + 1, tp)):
            for b in range(4, max_batch + 1, 4):
                m = simulate(Candidate("static", num_workers, tp, k, b), stats, costs)
                if m.feasible:
                    lats.append(m.latency(sla))
    if not lats:
        raise ValueError("no static-batching configuration fits in memory: cannot derive bounds")
    return [float(np.percentile(lats, q)) for q in (10, 30, 70)] + [math.inf]


@dataclass
class SweepPoint:
    bound: float
    policy: str
    best: tuple[Candidate, Metrics] | None
    seconds: float


def sweep(stats: WorkloadStats, costs: Costs, num_workers: int, bounds: list[float], *,
          policies: tuple[str, ...] = SWEEP_POLICIES, sla: str = "b",
          exhaustive: bool = False, max_in_flight: int | None = None) -> list[SweepPoint]:
    points = []
    for bound in bounds:
        for policy in policies:
            res = search(stats, costs, num_workers, bound if math.isfinite(bound) else 1e18,
                         policies=(policy,), sla=sla, use_exhaustive=exhaustive,
                         max_in_flight=max_in_flight)
            points.append(SweepPoint(bound, policy, res.best, res.seconds))
    return points


def sweep_table(points: list[SweepPoint], sla: str = "b") -> str:
    """Markdown: one row per (bound, policy) with knobs, latency, seq/s and the ratio to static."""
    static = {p.bound: p.best[1].throughput_seq_s for p in points
              if p.policy == "static" and p.best is not None}
    lines = ["| bound (s) | policy | knobs | latency (s) | seq/s | vs static |",
             "|---|---|---|---|---|---|"]
    for p in points:
        bound = "inf" if not math.isfinite(p.bound) else f"{p.bound:.2f}"
        if p.best is None:
            lines.append(f"| {bound} | {p.policy} | infeasible | - | - | - |")
            continue
        cand, m = p.best
        ratio = (f"{m.throughput_seq_s / static[p.bound]:.2f}x" if static.get(p.bound)
                 else "-")
        lines.append(f"| {bound} | {p.policy} | {knobs(cand)} | {m.latency(sla):.2f} | "
                     f"{m.throughput_seq_s:.2f} | {ratio} |")
    return "\n".join(lines)


def knobs(cand: Candidate) -> str:
    parts = [f"B_E={cand.B_E}" if cand.policy not in ("static", "continuous")
             else f"B={cand.B_E}"]
    if cand.policy == "rra":
        parts.append(f"N_D={cand.N_D}")
    if cand.policy.startswith("waa"):
        parts.append(f"B_m={cand.B_m}")
    parts.append(f"TP={cand.tp}x{cand.num_tp_workers // cand.tp}" if cand.tp > 1 else "TP=1")
    return ", ".join(parts)


def winners(points: list[SweepPoint], policies: tuple[str, ...] = ("rra", "waa-c", "waa-m")
            ) -> dict[float, str]:
    """Which ExeGPT policy gives the highest throughput at each bound."""
    out: dict[float, str] = {}
    for bound in dict.fromkeys(p.bound for p in points):
        best = [(p.best[1].throughput_seq_s, p.policy) for p in points
                if p.bound == bound and p.policy in policies and p.best is not None]
        out[bound] = max(best)[1] if best else "none"
    return out
