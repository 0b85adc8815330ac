"""The search's shortcuts change no number: the lean score and throughput equal what the full
metrics say, bit for bit; the WAA group bound really bounds; the shared-incumbent B&B returns
what separate searches return on a monotone problem, with fewer evaluations."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from coordinator.planner.bnb import Axis, Problem, branch_and_bound, branch_and_bound_many
from coordinator.planner.candidate import Candidate, WorkloadStats
from coordinator.planner.costs import Costs
from coordinator.planner.objective import (
    rra_fit_floor,
    rra_memory_floor,
    score,
    throughput,
    waa_bound,
    waa_memory_floor,
    waa_split_floor,
)
from coordinator.planner.scheduler import nd_grid
from coordinator.planner.simulator import simulate, waa_pipelines
from coordinator.planner.workload import preset
from tests.planner.test_simulator_golden import CLUSTERS, golden_cases


def _full_score(cand: Candidate, stats: WorkloadStats, costs: Costs, bound: float, sla: str
                ) -> tuple[float, float, float, bool]:
    """What the search scored before objective.py: from the full metrics."""
    m = simulate(cand, stats, costs)
    if m.throughput_seq_s <= 0:
        return 0.0, math.inf, m.latency(sla), m.feasible
    mem = max(m.worker_mem_bytes) / m.mem_capacity_bytes if m.worker_mem_bytes else 0.0
    return m.throughput_seq_s, max(m.latency(sla) / bound, mem), m.latency(sla), m.feasible


def test_lean_score_and_throughput_equal_the_full_metrics(a40_opt13b_costs, a40_t5_costs,
                                                          ) -> None:  # noqa: ANN001
    costs = {"opt-13b": a40_opt13b_costs, "t5-11b": a40_t5_costs}
    stats = {t: WorkloadStats(preset(t)) for t in ("S", "T", "G", "C2")}
    checked = floors = split_floors = 0
    for model, task, cand in golden_cases():
        if model not in costs:
            continue
        for bound, sla in ((7.5, "b"), (1e18, "a")):
            want = _full_score(cand, stats[task], costs[model], bound, sla)
            assert score(cand, stats[task], costs[model], bound, sla) == want, cand
        assert throughput(cand, stats[task], costs[model]) == want[0], cand
        if cand.policy == "rra":  # the memory floor is g's own memory term
            floor = rra_memory_floor(cand, stats[task], costs[model])
            assert floor <= want[1] and (floor > 1.0) == (not want[3]), cand
            nds = [*nd_grid(stats[task].s_max), cand.N_D]  # a bound over N_D: cand's included
            assert rra_fit_floor(cand, stats[task], costs[model], nds) <= floor, cand
        if cand.policy.startswith("waa"):
            floor = waa_memory_floor(cand, stats[task], costs[model])
            assert floor <= want[1] and (floor <= 1.0 or not want[3]), cand
            floors += floor > 1.0
            split_floor = waa_split_floor(replace(cand, B_m=1), stats[task], costs[model])
            assert split_floor <= want[1] and (split_floor <= 1.0 or not want[3]), cand
            split_floors += split_floor > 1.0
        checked += 1
    assert checked > 200 and floors > 0 and split_floors > 0 and set(CLUSTERS) >= set(costs)


@pytest.mark.parametrize("policy", ["waa-c", "waa-m"])
def test_waa_group_bound_and_memory_floor_hold_for_every_micro_batch_count(policy: str,
                                                          a40_t5_costs) -> None:  # noqa: ANN001
    stats = WorkloadStats(preset("C1"))
    for tp, k in ((1, 0), (2, 2), (2, 4)):
        for b_e in (1, 8, 64, 512):
            pipes = waa_pipelines(Candidate(policy, 8, tp, k, b_e), stats, a40_t5_costs)
            if pipes is None:
                continue
            top = len(pipes[1])
            bound = waa_bound(Candidate(policy, 8, tp, k, b_e), top, stats, a40_t5_costs)
            split_floor = waa_split_floor(Candidate(policy, 8, tp, k, b_e), stats, a40_t5_costs)
            for b_m in range(1, top + 1):
                cand = Candidate(policy, 8, tp, k, b_e, 1, b_m)
                f = throughput(cand, stats, a40_t5_costs)
                assert 0 < f <= bound
                floor = waa_memory_floor(cand, stats, a40_t5_costs)
                g = score(cand, stats, a40_t5_costs, 1e18, "b")[1]
                assert floor <= g and split_floor <= g


def _monotone(shift: float):  # noqa: ANN202
    def ev(x: tuple[int, ...]) -> tuple[float, float]:
        a, b = x[0] + 1, 30 - x[1]
        return math.log(a) + 0.5 * b + shift, (a * b) / (150.0 + 40 * shift)
    return ev


def test_shared_incumbent_finds_the_best_of_separate_searches_with_less_work() -> None:
    axes = [Axis(40, 1, 1), Axis(30, -1, -1)]
    shifts = [0.0, 0.7, 0.3, 1.1, 0.2]
    alone = [branch_and_bound(axes, _monotone(s), eps_t=0.0) for s in shifts]
    shared = branch_and_bound_many([Problem(axes, _monotone(s)) for s in shifts], eps_t=0.0)
    best_alone = max(r.best_f for r in alone)
    assert max(r.best_f for r in shared) == best_alone
    winner = max(range(len(shifts)), key=lambda i: alone[i].best_f)
    assert shared[winner].best == alone[winner].best
    assert sum(r.evaluated for r in shared) < sum(r.evaluated for r in alone)
    # a problem whose given bound is below the incumbent is never costed
    late = branch_and_bound_many([Problem(axes, _monotone(1.1)),
                                  Problem(axes, _monotone(0.0), bound=1.0)], eps_t=0.0)
    assert late[1].evaluated == 0 and late[1].best is None
