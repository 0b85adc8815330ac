"""XScheduler: the highest-throughput schedule under a latency bound, per policy and TP degree.

For every policy and every TP degree the knobs form an integer grid searched by branch and
bound (bnb.py); ``exhaustive=True`` enumerates the same grid. Axes and their directions:

- B_E (batch): throughput up, latency up;
- N_D (RRA): encoding less often shrinks the decode batch: throughput down, latency down;
- number of TP workers (for tp > 1): shorter pipeline: throughput down, latency down;
- B_m (WAA) and the TP workers of WAA change the worker groups themselves, so they are
  enumerated around a one-dimensional B&B over B_E; that B&B runs separately on each run of
  B_E values over which the WAA-C/M rule gives the same encoder/decoder split.

The constraint is ``g = max(latency / bound, memory / capacity)`` so out-of-memory plans are
pruned by the same monotone bound.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from coordinator.planner.bnb import Axis, BnBResult, branch_and_bound, exhaustive
from coordinator.planner.candidate import Candidate, Metrics, WorkloadStats
from coordinator.planner.costs import Costs
from coordinator.planner.rra_table import batch_grid
from coordinator.planner.simulator import nearest_split, simulate, waa_pipelines, waa_share

EXEGPT_POLICIES = ("rra", "waa-c", "waa-m")


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
    cache: dict[Candidate, Metrics] = field(default_factory=dict)

    def metrics(self, cand: Candidate) -> Metrics:
        if cand not in self.cache:
            self.cache[cand] = simulate(cand, self.stats, self.costs)
        return self.cache[cand]

    def score(self, cand: Candidate) -> tuple[float, float]:
        m = self.metrics(cand)
        if m.throughput_seq_s <= 0:
            return 0.0, float("inf")
        mem = max(m.worker_mem_bytes) / m.mem_capacity_bytes if m.worker_mem_bytes else 0.0
        return m.throughput_seq_s, max(m.latency(self.sla) / self.bound, mem)

    def tp_counts(self) -> list[int]:
        if self.tp == 1:
            return [0]
        return list(range(self.tp, self.num_workers + 1, self.tp))

    def search(self, use_exhaustive: bool, eps_t: float, eps_l: float) -> list[Candidate]:
        batches = batch_grid(4 * 128 if self.policy != "static" else 512)
        if self.policy == "static":
            batches = [b for b in batches if b % 4 == 0 or b == 1]
        algo = exhaustive if use_exhaustive else (
            lambda axes, fn: branch_and_bound(axes, fn, eps_t=eps_t, eps_l=eps_l))
        found: list[Candidate] = []
        if self.policy.startswith("waa"):
            shares = [waa_share(Candidate(self.policy, self.num_workers, B_E=b), self.stats,
                                self.costs) for b in batches]
            for k in self.tp_counts():
                segments = self._split_segments(batches, shares, k)
                micro = {i: self._max_micro(seg[0], k, eps_l) for i, seg in enumerate(segments)}
                for b_m in range(1, self.num_workers):
                    for i, seg in enumerate(segments):
                        if not use_exhaustive and b_m > micro[i]:
                            continue  # no point of this run can meet g <= 1 + eps_L: skip
                        make = self._maker(seg, [1], [k], b_m)
                        found += self._run(algo, [Axis(len(seg), 1, 1)], make)
            return found
        nds = nd_grid(self.stats.s_max) if self.policy == "rra" else [1]
        ks = self.tp_counts()
        axes = [Axis(len(batches), 1, 1), Axis(len(nds), -1, -1), Axis(len(ks), -1, -1)]
        return self._run(algo, axes, self._maker(batches, nds, ks, 1))

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
        heaviest = max(self.costs.weight_bytes(st) for pipe in pipes for st in pipe)
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

    def _maker(self, batches: list[int], nds: list[int], ks: list[int], b_m: int):  # noqa: ANN202
        def make(x: tuple[int, ...]) -> Candidate:
            nd = nds[x[1]] if len(x) > 1 else nds[0]
            k = ks[x[2]] if len(x) > 2 else ks[0]
            return Candidate(self.policy, self.num_workers, self.tp, k, batches[x[0]], nd, b_m)
        return make

    def _run(self, algo, axes: list[Axis], make) -> list[Candidate]:  # noqa: ANN001
        result: BnBResult = algo(axes, lambda x: self.score(make(x)))
        return [make(result.best)] if result.best is not None else []


def search(workload: WorkloadStats, costs: Costs, num_workers: int, latency_bound: float, *,
           policies: tuple[str, ...] = EXEGPT_POLICIES, sla: str = "b",
           use_exhaustive: bool = False, eps_t: float = 0.005, eps_l: float = 0.05,
           tp_sizes: list[int] | None = None) -> SearchResult:
    if latency_bound <= 0:
        raise ValueError(f"latency bound must be > 0 seconds, got {latency_bound}")
    if num_workers < 1:
        raise ValueError("need at least one worker")
    start = time.perf_counter()
    tps = [t for t in (tp_sizes or costs.profile.tp_sizes) if t <= num_workers]
    out = SearchResult(None, method="exhaustive" if use_exhaustive else "branch-and-bound")
    for policy in policies:
        if policy.startswith("waa") and num_workers < 2:
            continue
        for tp in tps:
            run = _Run(policy, tp, num_workers, workload, costs, latency_bound, sla)
            picks = run.search(use_exhaustive, eps_t, eps_l)
            out.evaluated += len(run.cache)
            _record(out, f"{policy}/tp{tp}", run, picks, sla)
    out.seconds = time.perf_counter() - start
    return out


def _record(out: SearchResult, key: str, run: _Run, picks: list[Candidate], sla: str) -> None:
    for cand, m in run.cache.items():
        if m.feasible and m.latency(sla) < out.tightest[0]:
            out.tightest = (m.latency(sla), cand)
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
