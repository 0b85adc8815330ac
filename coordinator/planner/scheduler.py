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
group of WAA runs.

The constraint is ``g = max(latency / bound, memory / capacity)`` so out-of-memory plans are
pruned by the same monotone bound. A concurrency cap (``max_in_flight``) adds ``requests in
flight / cap`` (inflight.py) to that maximum: the count grows with B_E and falls with N_D, g's
own directions, so branch and bound prunes by it too, and the exhaustive enumeration, which
scores every point the same way, skips the same candidates.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from coordinator.planner.bnb import Axis, Problem, branch_and_bound_many, exhaustive
from coordinator.planner.candidate import Candidate, Metrics, WorkloadStats
from coordinator.planner.costs import Costs
from coordinator.planner.inflight import candidate_in_flight
from coordinator.planner.objective import (
    Score,
    rra_fit_floor,
    rra_memory_floor,
    score,
    throughput,
    waa_bound,
    waa_memory_floor,
    waa_split_floor,
)
from coordinator.planner.rra_table import batch_grid
from coordinator.planner.simulator import simulate, waa_pipelines
from coordinator.planner.waa_split import nearest_split, waa_share

EXEGPT_POLICIES = ("rra", "waa-c", "waa-m")
# The paper's throughput tolerance: a box is dropped when its bound cannot beat its own
# problem's incumbent by more than eps_T. 0 by default: with every problem on one heap behind a
# shared incumbent, eps_T saves little search and costs plan quality (0.5% -> 0 found plans up
# to 1.9% better on the paper's clusters at about the same search time, docs/planner.md).
EPS_T = 0.0
_Maker = Callable[[tuple[int, ...]], Candidate]


def nd_grid(s_max: int) -> list[int]:
    grid = list(range(1, 33)) + list(range(34, 65, 2)) + list(range(68, 129, 4))
    return [n for n in grid + list(range(144, 1025, 16)) if n <= s_max]


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


@dataclass
class _Run:
    """One (policy, tp) search: the grid, the evaluator, and what it found."""

    policy: str
    tp: int
    num_workers: int
    stats: WorkloadStats
    costs: Costs
    bound: float
    sla: str
    max_in_flight: int | None = None  # the concurrency cap (None: none)
    cache: dict[Candidate, Metrics] = field(default_factory=dict)
    scores: dict[Candidate, Score] = field(default_factory=dict)
    f_cache: dict[Candidate, float] = field(default_factory=dict)

    def metrics(self, cand: Candidate) -> Metrics:
        if cand not in self.cache:
            self.cache[cand] = simulate(cand, self.stats, self.costs)
        return self.cache[cand]

    def score(self, cand: Candidate) -> tuple[float, float]:
        if cand not in self.scores:
            got = score(cand, self.stats, self.costs, self.bound, self.sla)
            if self.max_in_flight is not None and got[0] > 0:
                over = candidate_in_flight(cand, self.metrics(cand)) / self.max_in_flight
                got = (got[0], max(got[1], over), got[2], got[3])
            self.scores[cand] = got
        return self.scores[cand][:2]

    def objective(self, cand: Candidate) -> float:
        """score(cand)[0] without the latency and memory (objective.py)."""
        if cand in self.scores:
            return self.scores[cand][0]
        if cand not in self.f_cache:
            self.f_cache[cand] = throughput(cand, self.stats, self.costs)
        return self.f_cache[cand]

    def evaluated(self) -> int:
        """Candidates costed, fully or for their throughput alone."""
        return len(self.scores) + sum(1 for c in self.f_cache if c not in self.scores)

    def tp_counts(self) -> list[int]:
        if self.tp == 1:
            return [0]
        return list(range(self.tp, self.num_workers + 1, self.tp))

    def batches(self) -> list[int]:
        batches = batch_grid(4 * 128 if self.policy != "static" else 512)
        if self.policy == "static":
            batches = [b for b in batches if b % 4 == 0 or b == 1]
        return batches

    def grids(self, prune: bool, eps_l: float) -> list[tuple[list[Axis], _Maker, float]]:
        """The grids to search: (axes, point -> candidate, upper bound of f or inf).

        RRA/static/continuous: one grid over (B_E, N_D, TP workers). WAA: one B_E grid per
        (TP workers, B_m, run of B_E with the same split); ``prune`` skips the runs whose every
        point has g > 1 + eps_L (see ``_max_micro``) and bounds each run by its encoder."""
        batches = self.batches()
        if not self.policy.startswith("waa"):
            nds = nd_grid(self.stats.s_max) if self.policy == "rra" else [1]
            out: list[tuple[list[Axis], _Maker, float]] = []
            for k in self.tp_counts():
                bs = batches
                if prune and self.policy == "rra":
                    bs = _fitting_prefix(batches, lambda b, k=k: rra_fit_floor(
                        Candidate("rra", self.num_workers, self.tp, k, b), self.stats,
                        self.costs, nds) <= 1.0)
                if bs:
                    axes = [Axis(len(bs), 1, 1), Axis(len(nds), -1, -1)]
                    out.append((axes, self._maker(bs, nds, [k], 1), float("inf")))
            return out
        shares = [waa_share(Candidate(self.policy, self.num_workers, B_E=b), self.stats,
                            self.costs) for b in batches]
        grids = []
        for k in self.tp_counts():
            segments = self._split_segments(batches, shares, k)
            micro = [self._max_micro(seg[0], k, eps_l) if prune else self.num_workers
                     for seg in segments]
            if prune:
                segments = [self._fitting(seg, k) if m else seg
                            for seg, m in zip(segments, micro, strict=True)]
                micro = [m if seg else 0 for seg, m in zip(segments, micro, strict=True)]
            tops = [waa_bound(Candidate(self.policy, self.num_workers, self.tp, k, seg[-1]),
                              m, self.stats, self.costs) if prune and m else float("inf")
                    for seg, m in zip(segments, micro, strict=True)]
            for b_m in range(1, self.num_workers):
                for seg, max_m, top in zip(segments, micro, tops, strict=True):
                    if b_m <= max_m:
                        grids.append(([Axis(len(seg), 1, 1)], self._maker(seg, [1], [k], b_m),
                                      top))
        return grids

    def _fitting(self, seg: list[int], k: int) -> list[int]:
        """The B_E values of a WAA run whose B_m-free memory floor (``waa_split_floor``) is
        <= 1. Every other point has g > 1, so no run of the group can return it: cutting them
        changes no answer, and bounds the group at the largest B_E that can fit instead of at
        a B_E (up to 512) whose KV could never fit."""
        return _fitting_prefix(seg, lambda b: waa_split_floor(
            Candidate(self.policy, self.num_workers, self.tp, k, b), self.stats,
            self.costs) <= 1.0)

    def _max_micro(self, b_e: int, k: int, eps_l: float) -> int:
        """The largest B_m a WAA run over B_E values with ``b_e``'s split can use; 0 when the
        split cannot hold the TP workers or its weights alone exceed (1 + eps_L) x capacity.

        Every point of such a run has g > 1 + eps_L (memory >= weights; too many micro-batches
        or no fitting split is infeasible outright), so branch and bound would evaluate two
        corners and prune the run: skipping it changes nothing but the evaluation count."""
        pipes = waa_pipelines(Candidate(self.policy, self.num_workers, self.tp, k, b_e),
                              self.stats, self.costs)
        if pipes is None:
            return 0
        heaviest = max(max(self.costs.pipeline_weights(pipe)) for pipe in pipes)
        if heaviest > self.costs.capacity * (1.0 + eps_l):
            return 0
        return len(pipes[1])

    def _split_segments(self, batches: list[int], shares: list[float], k: int
                        ) -> list[list[int]]:
        """Runs of B_E over which the WAA-C/M rule keeps the same encoder/decoder split: the
        split changes the worker groups, so monotonicity only holds inside a run."""
        segments: list[list[int]] = []
        last = None
        for b, share in zip(batches, shares, strict=True):
            split = nearest_split(share, self.num_workers, self.tp, k)
            if split != last:
                segments.append([])
                last = split
            segments[-1].append(b)
        return segments

    def _maker(self, batches: list[int], nds: list[int], ks: list[int], b_m: int) -> _Maker:
        def make(x: tuple[int, ...]) -> Candidate:
            nd = nds[x[1]] if len(x) > 1 else nds[0]
            k = ks[x[2]] if len(x) > 2 else ks[0]
            return Candidate(self.policy, self.num_workers, self.tp, k, batches[x[0]], nd, b_m)
        return make

    def problem(self, axes: list[Axis], make: _Maker, bound: float) -> Problem:
        floor_of = {"rra": rra_memory_floor, "waa-c": waa_memory_floor,
                    "waa-m": waa_memory_floor}.get(self.policy)
        floor = None if floor_of is None else (
            lambda x: floor_of(make(x), self.stats, self.costs))
        return Problem(axes, lambda x: self.score(make(x)),
                       lambda x: self.objective(make(x)), bound, floor)


def _fitting_prefix(batches: list[int], fits: Callable[[int], bool]) -> list[int]:
    """The B_E values up to the last one that ``fits`` (bisection: the memory floors it asks
    grow with B_E, one batch's or one cycle's KV)."""
    lo, hi = 0, len(batches)  # the first B_E that does not fit lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(batches[mid]):
            lo = mid + 1
        else:
            hi = mid
    return batches[:lo]


def search(workload: WorkloadStats, costs: Costs, num_workers: int, latency_bound: float, *,
           policies: tuple[str, ...] = EXEGPT_POLICIES, sla: str = "b",
           use_exhaustive: bool = False, eps_t: float = EPS_T, eps_l: float = 0.05,
           tp_sizes: list[int] | None = None, max_in_flight: int | None = None
           ) -> SearchResult:
    """Best plan over every (policy, TP degree). Branch and bound runs all their grids on one
    heap sharing the incumbent (bnb.branch_and_bound_many): a run that cannot beat the best
    plan found elsewhere stops early, so ``per_run`` holds what each run found until then.
    ``max_in_flight``: only plans holding at most that many requests in flight (inflight.py);
    None: no cap, the search as without one, bit for bit."""
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
        out = _search(workload, costs, num_workers, latency_bound, policies, sla,
                      use_exhaustive, eps_t, eps_l, tp_sizes, max_in_flight)
    finally:
        if collecting:
            gc.enable()
    out.seconds = time.perf_counter() - start
    return out


def _search(workload: WorkloadStats, costs: Costs, num_workers: int, latency_bound: float,
            policies: tuple[str, ...], sla: str, use_exhaustive: bool, eps_t: float,
            eps_l: float, tp_sizes: list[int] | None, max_in_flight: int | None
            ) -> SearchResult:
    tps = [t for t in (tp_sizes or costs.profile.tp_sizes) if t <= num_workers]
    out = SearchResult(None, method="exhaustive" if use_exhaustive else "branch-and-bound")
    runs = [_Run(policy, tp, num_workers, workload, costs, latency_bound, sla, max_in_flight)
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
