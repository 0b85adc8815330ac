"""A plan's elasticities: its prediction re-simulated on a profile 5% off, part by part."""

from __future__ import annotations

import math
from typing import Any

import pytest

from common.models.config import ModelConfig
from coordinator.bench.calibrate import scaled_profile
from coordinator.bench.report import headline
from coordinator.bench.sensitivity import (
    elasticities,
    plan_candidate,
    predicted_under,
    well_conditioned,
    worst,
)
from coordinator.commands.plan import sensitivity
from coordinator.planner.analytic import analytic_profile
from coordinator.planner.candidate import Candidate, WorkloadStats
from coordinator.planner.planning import make_plan, plan_from
from coordinator.planner.simulator import simulate
from coordinator.planner.workload import parse_workload

WORKLOAD = parse_workload("T/4")


@pytest.mark.parametrize("policy", ["rra", "waa-c", "waa-m", "static", "continuous"])
def test_the_plans_own_candidate_reproduces_its_prediction(policy: str) -> None:
    profile = analytic_profile("a40", ModelConfig.preset("opt-13b"), "float16")
    wl = parse_workload("S")
    plan = make_plan(wl, profile, 4, 1e18, policy=policy)
    assert plan_candidate(plan).policy == plan.policy
    again = predicted_under(plan, wl, profile)
    assert again is not None
    for key in ("throughput_seq_s", "latency_p99len_s", "tpot_s", "ttft_s"):
        assert again[key] == pytest.approx(plan.predicted[key], rel=1e-12)


def _waa_plan(profile: Any, decode_scale: float) -> tuple[Any, Any]:
    moved = scaled_profile(profile, decode_scale, "test", 1.0)
    cand = Candidate("waa-c", 2, B_E=1)
    stats = WorkloadStats(WORKLOAD)
    return plan_from(cand, simulate(cand, stats, moved), stats, moved, 1e18, "b"), moved


def _boundary(profile: Any) -> float:
    """The decode scale where the WAA-C B_E 1 plan turns from encoder- to decoder-bound."""
    lo, hi = 0.01, 100.0
    for _ in range(50):
        mid = math.sqrt(lo * hi)
        plan, _ = _waa_plan(profile, mid)
        if plan.predicted["encode_period_s"] > plan.predicted["round_s"]:
            lo = mid
        else:
            hi = mid
    return lo


def test_a_waa_plan_feeding_its_decoders_at_capacity_is_ill_conditioned(
        cpu_roofline_profile: Any) -> None:
    """Decode compute-bound: the steady batch is ~ a / (1 - rho), so near rho = 1 a 5% error
    in the decode cost moves latency many times 5%; away from it, about 5%."""
    edge = _boundary(cpu_roofline_profile)
    for scale, ill in ((edge * 0.5, False), (edge, True), (edge * 2.0, False)):
        plan, profile = _waa_plan(cpu_roofline_profile, scale)
        e = elasticities(plan, WORKLOAD, profile)
        assert set(e) == {"decode", "encode"}
        assert well_conditioned(e) is (not ill), (scale / edge, e)
        said = sensitivity(plan, WORKLOAD, profile)  # what `exegpt plan` prints
        assert ("ill-conditioned" in said) is ill
        if ill:
            assert worst(e, "latency_p99len_s") > 5.0
        else:  # latency follows the decode cost one for one
            assert e["decode"]["latency_p99len_s"] == pytest.approx(1.0, abs=0.1)


def test_a_pipeline_plans_elasticities_share_out_the_compute(cpu_roofline_profile: Any) -> None:
    plan = make_plan(WORKLOAD, cpu_roofline_profile, 2, 1e18, policy="static", max_in_flight=48)
    e = elasticities(plan, WORKLOAD, cpu_roofline_profile)
    for key, sign in (("throughput_seq_s", -1.0), ("latency_p99len_s", 1.0)):
        total = e["decode"][key] + e["encode"][key]  # both parts x 1.05 ~ everything x 1.05
        assert sign * total == pytest.approx(1.0, abs=0.1)
        assert sign * e["decode"][key] > 0 and sign * e["encode"][key] >= 0
    assert well_conditioned(e)
    with pytest.raises(ValueError, match="perturbation"):
        elasticities(plan, WORKLOAD, cpu_roofline_profile, step=0.0)


def _row(bound: float, err: float, elasticity: float | None) -> dict:
    el = None if elasticity is None else {"decode": {"latency_p99len_s": elasticity},
                                          "encode": {"latency_p99len_s": 0.1}}
    return {"bound_s": bound, "policy": "exegpt", "fills": True, "reused_from": None,
            "measured": {"throughput_seq_s": 1.0, "bound_met": True},
            "error": {"throughput_seq_s": err, "latency_p99len_s": -err}, "elasticity": el}


def test_the_headline_reports_the_error_of_well_conditioned_plans_apart() -> None:
    rows = [_row(1.0, 0.04, 1.1), _row(2.0, 0.40, -7.5), _row(3.0, 0.02, None)]
    h = headline(rows)
    assert h["abs_error"]["latency_p99len_s"]["rows"] == 3
    assert h["abs_error"]["latency_p99len_s"]["mean"] == pytest.approx(0.46 / 3)
    good = h["abs_error_well_conditioned"]["latency_p99len_s"]
    assert good["rows"] == 1 and good["mean"] == pytest.approx(0.04)  # unknown: not counted
    assert h["ill_conditioned"] == [{"bound_s": 2.0, "policy": "exegpt",
                                     "latency_elasticity": 7.5}]
