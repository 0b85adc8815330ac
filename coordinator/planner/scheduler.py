"""XScheduler: the highest-throughput schedule under a latency bound, per policy and TP degree.

For every policy and every TP degree the knobs form an integer grid searched by branch and
bound (bnb.py); ``exhaustive=True`` enumerates the same grid. Axes and their directions:

- B_E (batch): throughput up, latency up;
- N_D (RRA): encoding less often shrinks the decode batch: throughput down, latency down;
- the number of TP workers (for tp > 1) changes the pipeline itself and is enumerated: its
  throughput is not monotone (on A100s, 12 or 16 TP-4 workers beat 4, so a box bounded at
  its fewest TP workers could hide the best plan); one (B_E, N_D) grid per count;
- B_m (WAA) and the TP workers of WAA change the worker groups themselves, so they are
  enumerated around a one-dimensional B&B over B_E; that B&B runs separately on each run of
  B_E values over which the WAA-C/M rule gives the same encoder/decoder split.

All grids of all (policy, tp) pairs share one heap and one incumbent (bnb.py), with cheap
bounds (objective.py): throughput alone for a box's bound, a memory floor of g, one bound per
group of WAA runs. The grids themselves are built in search_grids.py.

The throughput directions above are the paper's premise, and hold when no profiled cost per
unit of size rises with the size (monotone.py: true of the analytic profiles). When a
profile breaks it (measured CPU profiles), ``f_monotone`` is False and the search bounds
throughput without it (B_E: throughput / B_E never rises; N_D: no assumption; bnb.py), so
branch and bound still returns what the exhaustive enumeration does.

The constraint is ``g = max(latency / bound, memory / capacity)`` so out-of-memory plans are
pruned by the same monotone bound. A concurrency cap (``max_in_flight``) adds ``requests in
flight / cap`` (inflight.py) to that maximum: the count grows with B_E and falls with N_D, g's
own directions, so branch and bound prunes by it too, and the exhaustive enumeration, which
scores every point the same way, skips the same candidates.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

from coordinator.planner.bnb import branch_and_bound_many, exhaustive
from coordinator.planner.candidate import Candidate, Metrics, WorkloadStats
from coordinator.planner.costs import Costs
from coordinator.planner.inflight import candidate_in_flight
from coordinator.planner.monotone import per_unit_costs_fall
from coordinator.planner.search_grids import _Run, nd_grid

__all__ = ["EPS_T", "EXEGPT_POLICIES", "InfeasibleBound", "SearchResult", "nd_grid", "search",
           "tightest_latency"]

EXEGPT_POLICIES = ("rra", "waa-c", "waa-m")
# The paper's throughput tolerance: a box is dropped when its bound cannot beat its own
# problem's incumbent by more than eps_T. 0 by default: with every problem on one heap behind a
# shared incumbent, eps_T saves little search and costs plan quality (0.5% -> 0 found plans up
# to 1.9% better on the paper's clusters at about the same search time, docs/planner.md).
EPS_T = 0.0


class InfeasibleBound(ValueError):
    """No schedule meets the latency bound; the message names the tightest reachable one."""


@dataclass
class SearchResult:
    best: tuple[Candidate, Metrics] | None
    per_run: dict[str, tuple[Candidate, Metrics] | None] = field(default_factory=dict)
    tightest: tuple[float, Candidate | None] = (float("inf"), None)
    # with a cap: the fewest requests in flight of a costed plan meeting the bound and memory
    # (each grid's g-minimising corner, costed first, is also its fewest-in-flight point)
    fewest_in_flight: tuple[float, Candidate | None] = (float("inf"), None)
    evaluated: int = 0
    seconds: float = 0.0
    method: str = "branch-and-bound"


def search(workload: WorkloadStats, costs: Costs, num_workers: int, latency_bound: float, *,
           policies: tuple[str, ...] = EXEGPT_POLICIES, sla: str = "b",
           use_exhaustive: bool = False, eps_t: float = EPS_T, eps_l: float = 0.05,
           tp_sizes: list[int] | None = None, max_in_flight: int | None = None,
           f_monotone: bool | None = None) -> SearchResult:
    """Best plan over every (policy, TP degree). Branch and bound runs all their grids on one
    heap sharing the incumbent (bnb.branch_and_bound_many): a run that cannot beat the best
    plan found elsewhere stops early, so ``per_run`` holds what each run found until then.
    ``max_in_flight``: only plans holding at most that many requests in flight (inflight.py);
    None: no cap, the search as without one, bit for bit. ``f_monotone``: may branch and
    bound take throughput as monotone in B_E and N_D (None: ask the profile, monotone.py)."""
    if latency_bound <= 0:
        raise ValueError(f"latency bound must be > 0 seconds, got {latency_bound}")
    if num_workers < 1:
        raise ValueError("need at least one worker")
    if max_in_flight is not None and max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1 request (None: no cap), got "
                         f"{max_in_flight}")
    start = time.perf_counter()
    collecting = gc.isenabled()
    gc.disable()  # memos allocate ~10^5 objects: collections cost ~15% and find little
    try:
        if f_monotone is None:
            f_monotone = per_unit_costs_fall(costs.profile)
        out = _search(workload, costs, num_workers, latency_bound, policies, sla,
                      use_exhaustive, eps_t, eps_l, tp_sizes, max_in_flight, f_monotone)
    finally:
        if collecting:
            gc.enable()
    out.seconds = time.perf_counter() - start
    return out


def _search(workload: WorkloadStats, costs: Costs, num_workers: int, latency_bound: float,
            policies: tuple[str, ...], sla: str, use_exhaustive: bool, eps_t: float,
            eps_l: float, tp_sizes: list[int] | None, max_in_flight: int | None,
            f_monotone: bool) -> SearchResult:
    tps = [t for t in (tp_sizes or costs.profile.tp_sizes) if t <= num_workers]
    out = SearchResult(None, method="exhaustive" if use_exhaustive else "branch-and-bound")
    runs = [_Run(policy, tp, num_workers, workload, costs, latency_bound, sla, max_in_flight,
                 f_monotone)
            for policy in policies if not (policy.startswith("waa") and num_workers < 2)
            for tp in tps]
    grids = [(run, make, axes, bound) for run in runs
             for axes, make, bound in run.grids(not use_exhaustive, eps_l)]
    if use_exhaustive:
        results = [exhaustive(axes, lambda x, r=run, m=make: r.score(m(x)))
                   for run, make, axes, _ in grids]
    else:
        results = branch_and_bound_many([run.problem(axes, make, bound)
                                         for run, make, axes, bound in grids],
                                        eps_t=eps_t, eps_l=eps_l)
    picks: dict[int, list[Candidate]] = {id(run): [] for run in runs}
    for (run, make, _, _), res in zip(grids, results, strict=True):
        if res.best is not None:
            picks[id(run)].append(make(res.best))
    for run in runs:
        out.evaluated += run.evaluated()
        _record(out, f"{run.policy}/tp{run.tp}", run, picks[id(run)], run.sla)
    return out


def _record(out: SearchResult, key: str, run: _Run, picks: list[Candidate], sla: str) -> None:
    for cand, (f, _, lat, fits) in run.scores.items():
        if fits and lat < out.tightest[0]:
            out.tightest = (lat, cand)
        if run.max_in_flight is not None and f > 0 and fits and lat <= run.bound:
            held = candidate_in_flight(cand, run.metrics(cand))
            if held < out.fewest_in_flight[0]:
                out.fewest_in_flight = (held, cand)
    scored = [(run.metrics(c).throughput_seq_s, c) for c in picks]
    if not scored:
        out.per_run[key] = None
        return
    _, cand = max(scored, key=lambda t: t[0])
    out.per_run[key] = (cand, run.metrics(cand))
    if out.best is None or run.metrics(cand).throughput_seq_s > out.best[1].throughput_seq_s:
        out.best = (cand, run.metrics(cand))


def tightest_latency(workload: WorkloadStats, costs: Costs, num_workers: int, *,
                     policies: tuple[str, ...] = EXEGPT_POLICIES, sla: str = "b"
                     ) -> tuple[float, Candidate | None]:
    """The lowest latency any plan in the space reaches (for the infeasible-bound message).

    With a bound no plan meets, every search evaluates the latency-minimising corner of its
    grid (the root box's lower bound) and stops, so this costs a handful of evaluations."""
    res = search(workload, costs, num_workers, 1e-12, policies=policies, sla=sla)
    return res.tightest
