"""Live re-planning keeps the served plan's concurrency cap (``search.max_in_flight``)."""

from __future__ import annotations

from coordinator.adapt_replan import best_on_layout, layout, replan_job
from coordinator.planner.analytic import parse_profile_arg
from coordinator.planner.plan import Plan
from coordinator.planner.planning import make_plan
from coordinator.planner.workload import parse_workload

PROFILE = "analytic:a40:smollm2-135m"
SHORT = "name=short;in=normal:64,32,128;out=normal:8,3,20"
LONG = "name=long;in=normal:64,32,128;out=normal:32,17,80"
CAP = 40


def _held(plan: Plan) -> float:
    return float(plan.predicted["requests_in_flight"])


def test_replan_job_and_best_on_layout_keep_the_cap() -> None:
    profile = parse_profile_arg(PROFILE)
    served = make_plan(parse_workload(SHORT), profile, 2, 1e18, policy="static",
                       max_in_flight=CAP)
    assert served.search["max_in_flight"] == CAP and _held(served) <= CAP
    # without the cap the re-plan would pick a plan holding more: the test can fail
    free = make_plan(parse_workload(LONG), profile, 2, 1e18, policy="static")
    assert _held(free) > CAP

    out = replan_job(served.to_json(), PROFILE, LONG)
    best = Plan.from_json(out["best"])
    assert best.search["max_in_flight"] == CAP and _held(best) <= CAP

    fit = best_on_layout(served, parse_workload(LONG), profile)
    assert fit is not None and layout(fit) == layout(served)
    assert fit.search["max_in_flight"] == CAP and _held(fit) <= CAP
    uncapped = Plan.from_json(served.to_json())
    uncapped.search["max_in_flight"] = None
    wide = best_on_layout(uncapped, parse_workload(LONG), profile)
    assert wide is not None and _held(wide) > CAP
