"""The plan each (bound, policy) pair runs, and whether this build's runner can run it.

`exegpt` is the planner's own choice among its policies (RRA, WAA-C, WAA-M); every policy is
planned as asked, under the bench's concurrency cap (``BenchConfig.in_flight_cap``, the
planner's ``max_in_flight``). The runner runs every plan the planner makes; a plan it still
refuses (a malformed plan file) is reported with the runner's reason, never swapped for
another.
Static plans at a fixed batch size (the bound derivation) are built from the simulator
directly, as the planner's sweep does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from coordinator.bench.config import POLICY_FAMILIES

NO_BOUND = 1e18  # what the planner searches with when there is no bound


@dataclass(frozen=True)
class PlanChoice:
    """A plan (None: the planner found none) and why it is or is not what runs."""

    policy: str
    plan: Any | None
    runnable: bool
    note: str = ""


def runnable_problem(plan: Any, null_model: bool) -> str | None:
    """The runner's reason for refusing ``plan`` (None: it runs it)."""
    from coordinator.plan_launch import plan_fields

    try:
        plan_fields(plan, null_model=null_model, decoder_capacity=256)
    except ValueError as exc:
        return str(exc)
    return None


def _make(family: str, workload: Any, profile: Any, workers: int, bound: float | None,
          max_in_flight: int | None) -> tuple[Any | None, str]:
    from coordinator.planner.planning import make_plan
    from coordinator.planner.scheduler import InfeasibleBound

    try:
        return make_plan(workload, profile, workers, NO_BOUND if bound is None else bound,
                         policy=family, max_in_flight=max_in_flight), ""
    except InfeasibleBound as exc:
        return None, str(exc)


def choose_plan(policy: str, workload: Any, profile: Any, workers: int, bound: float | None,
                null_model: bool, max_in_flight: int | None = None) -> PlanChoice:
    """The plan ``policy`` runs under ``bound`` holding at most ``max_in_flight`` requests in
    flight (None: no cap; see the module docstring)."""
    plan, why = _make(POLICY_FAMILIES[policy], workload, profile, workers, bound, max_in_flight)
    if plan is None:
        return PlanChoice(policy, None, False, why)
    problem = runnable_problem(plan, null_model)
    if problem is None:
        return PlanChoice(policy, plan, True)
    return PlanChoice(policy, plan, False, f"not runnable: {problem}")


def static_plan(batch: int, workload: Any, profile: Any, workers: int) -> Any | None:
    """The static-batching plan of batch size ``batch`` on every worker as a pipeline stage
    (None: it does not fit in memory)."""
    from coordinator.planner.candidate import Candidate, WorkloadStats
    from coordinator.planner.costs import Costs
    from coordinator.planner.planning import plan_from
    from coordinator.planner.simulator import simulate

    stats = WorkloadStats(workload)
    cand = Candidate("static", workers, 1, 0, batch)
    metrics = simulate(cand, stats, Costs(profile))
    if not metrics.feasible:
        return None
    return plan_from(cand, metrics, stats, profile, NO_BOUND, "b")


def knobs(plan: Any) -> str:
    """The plan's knobs in one short string (results.md)."""
    parts = [f"B_E={plan.B_E}"] if plan.policy.startswith(("waa", "rra")) else [f"B={plan.B_E}"]
    if plan.N_D is not None:
        parts.append(f"N_D={plan.N_D}")
    if plan.B_m is not None:
        parts.append(f"B_m={plan.B_m}")
    tps = sorted({g.tp_size for g in plan.worker_groups})
    roles = ",".join(f"{g.role[:3]}{list(g.layer_range)}" for g in plan.worker_groups)
    parts.append(f"tp={'/'.join(map(str, tps))}")
    parts.append(roles)
    return " ".join(parts)
