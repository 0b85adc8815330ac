"""The concurrency cap (``max_in_flight``): the search honours it, branch and bound agrees with
the exhaustive enumeration under it, and the in-flight count is one definition per policy."""

from __future__ import annotations

import math
import re

import pytest

from coordinator.cli import main
from coordinator.planner.candidate import WorkloadStats
from coordinator.planner.costs import Costs
from coordinator.planner.des_events import waa_cap
from coordinator.planner.inflight import candidate_in_flight, plan_in_flight, requests_in_flight
from coordinator.planner.planning import make_plan
from coordinator.planner.scheduler import InfeasibleBound, search
from coordinator.planner.workload import preset

ALL = ("rra", "waa-c", "waa-m", "static", "continuous")


def _held(result) -> float:  # noqa: ANN001
    cand, metrics = result.best
    return candidate_in_flight(cand, metrics)


@pytest.mark.parametrize("cap", [64, 30])
def test_bnb_equals_exhaustive_under_a_cap_that_removes_the_best_plan(
        cap: int, a40_t5_costs: Costs) -> None:
    """T5-11B on 2 A40s at TP 2 (a small space, as in test_scheduler): uncapped, the best
    plan (RRA) holds about 105 requests; capped, both searches pick the same other plan
    within the cap (64: another RRA plan; 30: continuous batching)."""
    stats = WorkloadStats(preset("S"))
    free = search(stats, a40_t5_costs, 2, 4.0, policies=ALL, tp_sizes=[2])
    assert free.best is not None and _held(free) > cap
    fast = search(stats, a40_t5_costs, 2, 4.0, policies=ALL, tp_sizes=[2], max_in_flight=cap)
    slow = search(stats, a40_t5_costs, 2, 4.0, policies=ALL, tp_sizes=[2], max_in_flight=cap,
                  use_exhaustive=True)
    assert fast.best is not None and slow.best is not None
    assert fast.best[0] == slow.best[0]
    assert fast.best[1].throughput_seq_s == slow.best[1].throughput_seq_s
    assert _held(fast) <= cap and fast.best[1].latency("b") <= 4.0
    assert fast.best[0] != free.best[0]
    assert fast.best[1].throughput_seq_s < free.best[1].throughput_seq_s
    assert fast.evaluated < slow.evaluated


@pytest.mark.parametrize("policy", ["static", "continuous", "rra", "waa"])
def test_each_policy_honours_the_cap(policy: str, a40_opt13b_costs: Costs) -> None:
    profile = a40_opt13b_costs.profile
    free = make_plan(preset("S"), profile, 4, 1e18, policy=policy)
    cap = max(1, int(plan_in_flight(free) // 2))  # a cap the free plan breaks
    capped = make_plan(preset("S"), profile, 4, 1e18, policy=policy, max_in_flight=cap)
    assert plan_in_flight(free) > cap >= plan_in_flight(capped)
    assert capped.predicted["throughput_seq_s"] < free.predicted["throughput_seq_s"]
    assert capped.search["max_in_flight"] == cap and free.search["max_in_flight"] is None
    assert capped.predicted["requests_in_flight"] == plan_in_flight(capped)


def test_a_cap_above_every_plan_changes_nothing(a40_opt13b_costs: Costs) -> None:
    free = make_plan(preset("S"), a40_opt13b_costs.profile, 4, 6.0)
    capped = make_plan(preset("S"), a40_opt13b_costs.profile, 4, 6.0, max_in_flight=10**6)
    assert (capped.policy, capped.B_E, capped.N_D, capped.B_m) == (
        free.policy, free.B_E, free.N_D, free.B_m)
    assert capped.predicted == free.predicted


def test_an_impossible_cap_is_named(a40_opt13b_costs: Costs) -> None:
    """A WAA plan holds at least a decoder batch plus the batch being encoded: 3 cannot be.
    The message names the cap and the smallest one that works."""
    profile = a40_opt13b_costs.profile
    with pytest.raises(InfeasibleBound, match=r"at most 3 requests in flight \(the "
                                              r"max_in_flight cap\) and meets the 6 s bound"
                       ) as info:
        make_plan(preset("S"), profile, 4, 6.0, policy="waa", max_in_flight=3)
    least = int(re.search(r"raise the cap to at least (\d+)", str(info.value)).group(1))
    plan = make_plan(preset("S"), profile, 4, 6.0, policy="waa", max_in_flight=least)
    assert least - 1 < plan_in_flight(plan) <= least
    with pytest.raises(InfeasibleBound, match=f"at most {least - 1} requests"):
        make_plan(preset("S"), profile, 4, 6.0, policy="waa", max_in_flight=least - 1)
    with pytest.raises(InfeasibleBound, match="tightest reachable latency"):  # not the cap
        make_plan(preset("S"), a40_opt13b_costs.profile, 4, 0.05, max_in_flight=1000)
    with pytest.raises(ValueError, match="max_in_flight must be >= 1"):
        make_plan(preset("S"), a40_opt13b_costs.profile, 4, 6.0, max_in_flight=0)


def test_in_flight_per_policy_from_knobs(a40_opt13b_costs: Costs) -> None:
    """static/continuous: B x streams; rra: B_D x streams; WAA: the decoders' peak batch plus
    the batches encoded but not merged, which the runner's decode band (its decoders'
    capacity, plan_launch) holds."""
    assert requests_in_flight("static", 8, 8.0, 4, {}) == 32
    assert requests_in_flight("continuous", 8, 8.0, 2, {}) == 16
    assert requests_in_flight("rra", 4, 23.5, 2, {}) == 47.0
    extra = {"encode_latency_s": 0.3, "handoff_s": 0.01, "encode_period_s": 0.2,
             "round_s": 0.1, "peak_decode_batch": 40.0}  # encoder-bound: ceil(0.31/0.2) + 1
    assert waa_cap(extra) == 3
    assert requests_in_flight("waa-c", 5, 30.0, 1, extra) == 40.0 + 5 * 3
    assert requests_in_flight("waa-m", 5, 30.0, 1, {}) == 30.0 + 5  # an older plan file
    with pytest.raises(ValueError, match="policy"):
        requests_in_flight("fifo", 1, 1.0, 1, {})
    for policy in ("rra", "waa", "static", "continuous"):
        plan = make_plan(preset("S"), a40_opt13b_costs.profile, 4, 6.0, policy=policy)
        held = plan_in_flight(plan)
        assert math.isfinite(held) and held >= plan.B_E
        if plan.policy.startswith("waa"):
            assert plan.adjust["decode_batch"][1] >= held >= plan.B_D + plan.B_E
        else:
            assert held == pytest.approx(plan.microbatches * plan.B_D)


def test_cli_plan_max_in_flight(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", "--profile", "analytic:a40:opt-13b", "--workload", "S",
            "--latency-bound", "inf", "--gpus", "4", "--policy", "static"]
    assert main([*args, "--max-in-flight", "24"]) == 0
    out = capsys.readouterr().out
    assert "(cap 24)" in out and "B_E=24" in out
    assert main([*args, "--max-in-flight", "0"]) == 0
    assert "(no cap)" in capsys.readouterr().out
    assert main([*args, "--policy", "waa", "--max-in-flight", "2"]) == 2
    assert "at most 2 requests in flight" in capsys.readouterr().err
    assert main([*args, "--max-in-flight", "-1"]) == 1
