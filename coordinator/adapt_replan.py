"""The adapter's planning side: what a plan's knobs and layout are, and the re-plan itself,
run in a spawned planner process (plain values in and out, so the coordinator's event loop
never waits for the planner's numpy/scipy search).

    replan_job(plan, profile, observed workload)
        best         the best plan for the observed law (same policy, bound, SLA, workers)
        on_layout    when ``best`` needs other worker groups: the best knobs on the served ones
    best_on_layout   the knob search on a fixed layout (also coordinator.replan_live's, for the
                     workers left after a loss)
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from coordinator.planner.plan import Plan


def knobs(plan: Plan) -> dict[str, Any]:
    """The knobs a plan sets that can change while serving."""
    return {"policy": plan.policy, "B_E": plan.B_E, "N_D": plan.N_D,
            "token_sum": plan.adjust.get("token_sum"),
            "decode_batch": plan.adjust.get("decode_batch")}


def layout(plan: Plan) -> tuple[Any, ...]:
    """What re-laying out would change: policy, worker groups, B_m (WAA decode pipeline)."""
    return (plan.policy, plan.worker_groups, plan.B_m if plan.policy.startswith("waa") else None)


# ---- the background job (runs in a spawned process: plain values in and out) ---------------
def warm_up() -> None:
    """Import the planner in the pool's process before it is needed."""
    import coordinator.planner.planning  # noqa: F401
    import coordinator.planner.simulator  # noqa: F401


def profile_correction(ratios: Sequence[float], reference: float | None, shift: float,
                       recent: int) -> float | None:
    """The factor a re-plan scales the profile by, or None (the profile holds).

    ``ratios``: measured / predicted time per output token of the requests finished under
    the served plan, oldest first; ``reference``: their median once the plan had served
    ``recent`` of them. The ratio itself is not drift (a profile measured on another machine,
    or an analytic one, makes it arbitrary but constant); its *change* is: the machine got
    slower or faster since the plan went live (contention, another tenant, throttling). When
    the median of the latest ``recent`` ratios is off the reference by more than ``shift``
    (relative), the re-plan's profile is scaled by ``now / reference``."""
    if reference is None or len(ratios) < recent:
        return None
    now = statistics.median(list(ratios)[-recent:])
    scale = now / reference
    return scale if abs(scale - 1) > shift else None


def replan_job(plan_json: str, profile_spec: str, workload_spec: str,
               profile_scale: float | None = None) -> dict[str, Any]:
    """Best plan for the observed workload (same policy, bound, SLA, workers), and, when that
    plan needs other worker groups, the best knobs on the served layout; on a profile whose
    compute times are x ``profile_scale`` if given (``profile_correction``)."""
    from coordinator.bench.calibrate import scaled_profile
    from coordinator.planner.analytic import parse_profile_arg
    from coordinator.planner.planning import make_plan
    from coordinator.planner.scheduler import InfeasibleBound
    from coordinator.planner.workload import parse_workload

    start = time.perf_counter()
    old = Plan.from_json(plan_json)
    profile = parse_profile_arg(profile_spec, old.profile_meta.get("dtype"))
    if profile_scale is not None:
        profile = scaled_profile(profile, profile_scale, "adapt: measured / predicted time "
                                 f"per token x{profile_scale:.3g} since the plan went live")
    workload = parse_workload(workload_spec)
    out: dict[str, Any] = {"best": None, "on_layout": None, "infeasible": None,
                           "profile_scale": profile_scale}
    try:
        best = make_plan(workload, profile, old.num_workers, old.latency_bound_s,
                         policy=old.policy, sla=old.sla,
                         max_in_flight=old.search.get("max_in_flight"))
        out["best"] = best.to_json()
    except InfeasibleBound as exc:
        best, out["infeasible"] = None, str(exc)
    if best is None or layout(best) != layout(old):
        fit = best_on_layout(old, workload, profile)
        out["on_layout"] = fit.to_json() if fit is not None else None
    out["seconds"] = time.perf_counter() - start
    return out


NEAR_FASTEST = 0.05  # no knobs meet the bound: within this of the lowest latency, most seq/s


def best_on_layout(old: Plan, workload: Any, profile: Any, *, num_workers: int | None = None,
                   num_tp_workers: int | None = None, b_m: int | None = None,
                   num_encoders: int = 0,
                   same: Callable[[Plan], bool] | None = None) -> Plan | None:
    """Highest throughput meeting the bound among knob changes (B_E, N_D) that keep the
    served worker groups. If none meets it: the highest throughput among those within
    NEAR_FASTEST of the lowest latency (flagged ``meets_bound: false`` in ``search``): the
    lowest latency alone is typically B_E 1, trading most of the throughput for a latency a
    few percent lower while the queue grows (docs/adaptation.md, "Re-planning").
    ``num_encoders`` fixes WAA's encoder count (0: the WAA-C/M rule picks it per B_E).
    ``num_workers``/``num_tp_workers``/``b_m`` and ``same`` (is a plan on the wanted layout?)
    default to the served plan's; the live re-plan after a worker loss (coordinator.
    replan_live) passes the workers that remain. The served plan's concurrency cap
    (``search.max_in_flight``) holds here too: knobs holding more requests are not offered."""
    from coordinator.planner.candidate import Candidate, WorkloadStats
    from coordinator.planner.costs import Costs
    from coordinator.planner.inflight import candidate_in_flight
    from coordinator.planner.planning import plan_from
    from coordinator.planner.rra_table import batch_grid
    from coordinator.planner.scheduler import nd_grid
    from coordinator.planner.simulator import simulate

    stats, costs = WorkloadStats(workload), Costs(profile)
    nds = nd_grid(stats.s_max) if old.policy == "rra" else [1]
    workers = old.num_workers if num_workers is None else num_workers
    tp_workers = old.search.get("num_tp_workers", 0) if num_tp_workers is None else num_tp_workers
    micro = (old.B_m or 1) if b_m is None else b_m
    same = same or (lambda plan: layout(plan) == layout(old))
    cap = old.search.get("max_in_flight")
    found: list[tuple[float, float, Any, Any]] = []  # (latency, seq/s, candidate, metrics)
    for b_e in batch_grid(512):
        for n_d in nds:
            cand = Candidate(old.policy, workers, old.search.get("tp", 1), tp_workers, b_e,
                             n_d, micro, num_encoders if old.policy.startswith("waa") else 0)
            m = simulate(cand, stats, costs)
            mem_ok = not m.worker_mem_bytes or max(m.worker_mem_bytes) <= m.mem_capacity_bytes
            capped = cap is not None and candidate_in_flight(cand, m) > cap
            if m.feasible and m.throughput_seq_s > 0 and mem_ok and not capped:
                found.append((m.latency(old.sla), m.throughput_seq_s, cand, m))
    if not found:
        return None
    meeting = [f for f in found if f[0] <= old.latency_bound_s]
    near = min(f[0] for f in found) * (1.0 + NEAR_FASTEST)
    # in order of preference; plans are built lazily (WAA's encoder/decoder split follows
    # B_E, so a candidate may change the layout: skipped)
    for pool, meets in ((sorted(meeting, key=lambda f: -f[1]), True),
                        (sorted((f for f in found if f[0] <= near), key=lambda f: -f[1]), False),
                        (sorted(found, key=lambda f: f[0]), False)):
        for _, _, cand, m in pool:
            plan = plan_from(cand, m, stats, profile, old.latency_bound_s, old.sla,
                             max_in_flight=cap)
            if same(plan):
                if not meets:
                    plan.search["meets_bound"] = False
                return plan
    return None


def planner_pool(on_warm: Callable[[], None] | None = None
                 ) -> concurrent.futures.ProcessPoolExecutor:
    """One spawned planner process (spawn: the coordinator's ZeroMQ threads must not be
    forked), warming up (imports) at once; ``on_warm`` runs when it is ready."""
    ctx = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx)
    warm = pool.submit(warm_up)
    if on_warm is not None:
        warm.add_done_callback(lambda _: on_warm())
    return pool


def stop_planner_pool(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    """A search in progress is abandoned (its process terminated), not awaited."""
    procs = list(getattr(pool, "_processes", {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()

