"""The grids XScheduler searches, per (policy, TP degree): axes, point -> candidate, bounds.

One ``_Run`` per (policy, tp): its B_E x N_D grids (RRA, static, continuous; one per number of
TP workers) or its B_E grids (WAA; one per TP workers, B_m and run of B_E with one WAA-C/M
split), each turned into a ``bnb.Problem`` with cheap bounds and memory floors (objective.py).
Split out of scheduler.py, which runs the search over them.

``f_monotone`` (scheduler: ``monotone.per_unit_costs_fall`` of the profile) says whether
throughput may be declared monotone along B_E and N_D (the paper's B&B). When it may not, B_E is
a ratio axis (throughput / B_E never rises: no cost falls with the batch), N_D a free axis, and a
WAA group's bound is the largest per-B_E bound over its run instead of the one at its largest
B_E (bnb.py): the search is then exact whatever the shape of throughput, as long as latency and
memory stay monotone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from coordinator.planner.bnb import Axis, Problem
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

_Maker = Callable[[tuple[int, ...]], Candidate]


def nd_grid(s_max: int) -> list[int]:
    grid = list(range(1, 33)) + list(range(34, 65, 2)) + list(range(68, 129, 4))
    return [n for n in grid + list(range(144, 1025, 16)) if n <= s_max]


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
    f_monotone: bool = True  # throughput monotone in B_E and N_D (module docstring)
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
                    out.append((self._axes(bs, len(nds)), self._maker(bs, nds, [k], 1),
                                float("inf")))
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
            tops = [self._group_bound(seg, k, m) if prune and m else float("inf")
                    for seg, m in zip(segments, micro, strict=True)]
            for b_m in range(1, self.num_workers):
                for seg, max_m, top in zip(segments, micro, tops, strict=True):
                    if b_m <= max_m:
                        grids.append((self._axes(seg), self._maker(seg, [1], [k], b_m), top))
        return grids

    def _axes(self, batches: list[int], num_nd: int | None = None) -> list[Axis]:
        """The B_E axis (and the N_D one): the paper's directions when ``f_monotone``, else
        a ratio axis for B_E and a free one for N_D (bnb.py)."""
        if self.f_monotone:
            b_axis = Axis(len(batches), 1, 1)
            nd_axis = None if num_nd is None else Axis(num_nd, -1, -1)
        else:
            b_axis = Axis(len(batches), 0, 1, tuple(float(b) for b in batches))
            nd_axis = None if num_nd is None else Axis(num_nd, 0, -1)
        return [b_axis] if nd_axis is None else [b_axis, nd_axis]

    def _group_bound(self, seg: list[int], k: int, max_micro: int) -> float:
        """An upper bound of throughput over a group of WAA runs (every B_m <= ``max_micro``,
        every B_E of ``seg``): ``waa_bound`` at the largest B_E when throughput grows with
        B_E, else the largest ``waa_bound`` over the run (each bounds its own B_E)."""
        def at(b: int) -> float:
            return waa_bound(Candidate(self.policy, self.num_workers, self.tp, k, b),
                             max_micro, self.stats, self.costs)
        return at(seg[-1]) if self.f_monotone else max(at(b) for b in seg)

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
