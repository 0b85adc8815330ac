"""Which plan each policy runs: the planner's, or (exegpt only) the best runnable one."""

from __future__ import annotations

import pytest

from common.models.config import ModelConfig
from coordinator.bench import plans
from coordinator.bench.evaluate import in_flight, plan_key
from coordinator.planner.analytic import analytic_profile
from coordinator.planner.workload import parse_workload

PROFILE = analytic_profile("a40", ModelConfig.preset("opt-13b"), "float16")
WORKLOAD = parse_workload("S")


def test_policies_plan_their_own_family() -> None:
    for policy, family in (("static", "static"), ("continuous", "continuous"), ("rra", "rra")):
        choice = plans.choose_plan(policy, WORKLOAD, PROFILE, 4, None, True)
        assert choice.plan is not None and choice.plan.policy == family
    waa = plans.choose_plan("waa", WORKLOAD, PROFILE, 4, None, True)
    assert waa.plan.policy in ("waa-c", "waa-m")


def test_an_unmeetable_bound_is_reported_not_run() -> None:
    choice = plans.choose_plan("static", WORKLOAD, PROFILE, 4, 1e-6, True)
    assert choice.plan is None and not choice.runnable
    assert "tightest reachable latency" in choice.note


def test_a_refused_plan_is_reported_never_swapped(monkeypatch: pytest.MonkeyPatch) -> None:
    best = plans.choose_plan("exegpt", WORKLOAD, PROFILE, 4, None, True).plan
    monkeypatch.setattr(plans, "runnable_problem", lambda plan, null: "refused")
    for policy in ("exegpt", "static"):
        choice = plans.choose_plan(policy, WORKLOAD, PROFILE, 4, None, True)
        assert not choice.runnable and choice.note == "not runnable: refused"
    assert plans.choose_plan("exegpt", WORKLOAD, PROFILE, 4, None, True).plan.policy == best.policy


def test_static_plan_at_a_fixed_batch_and_plan_identity() -> None:
    a = plans.static_plan(8, WORKLOAD, PROFILE, 4)
    assert a.policy == "static" and a.B_E == 8 and a.microbatches == 4
    assert in_flight(a) == 32
    assert plan_key(a) == plan_key(plans.static_plan(8, WORKLOAD, PROFILE, 4))
    assert plan_key(a) != plan_key(plans.static_plan(12, WORKLOAD, PROFILE, 4))
    assert "B=8" in plans.knobs(a)


def test_a_t5_waa_plan_runs_unstaged() -> None:
    """A T5 WAA plan's encoder group holds the whole encoder and no decoder layers: one
    encoder and one decoder worker, not a layer split the runner would refuse."""
    t5 = analytic_profile("a40", ModelConfig.preset("tiny-t5"), "float16")
    choice = plans.choose_plan("waa", parse_workload("S/4"), t5, 2, None, True)
    assert choice.plan is not None and choice.runnable, choice.note
    assert plans.runnable_problem(choice.plan, False) is None
    roles = [(g.role, tuple(g.layer_range)) for g in choice.plan.worker_groups]
    assert roles == [("encoder", (0, 0)), ("decoder", (0, 2))]
