"""Adapting the served plan to the traffic: detect drift, re-plan in the background, switch knobs.

    observe_arrival(request)   admitted: input length; the request's live token count is read
                               at each evaluation (in-flight outputs = censored lengths);
                               every ``eval_every`` arrivals (at most every 50 ms) evaluate
                               (coordinator.drift); on drift start ONE re-plan
    observe_finish(request)    answered: its output length (exact, or a lower bound if failed)
                               and its time per token / the plan's TPOT (reported only)
    tick(now)                  the coordinator's heartbeat: evaluate if arrivals stopped short
                               of a due evaluation; give up a re-plan after its timeout

    drift --> replan_job (ProcessPoolExecutor, spawn: the planner's numpy/scipy search never
              blocks the event loop) --> done callback on the loop thread --> apply
    apply:  same worker groups (roles, counts, tp_size, layer ranges) -> the new knobs go live
            at once: B_E and the adjustment bands (a new BatchSizer: the next encode batch uses
            it), pipeline plans' B and N_D (each stream's knobs: its next pass / RRA cycle);
            logged ``plan_switch`` with the reason, old and new knobs and the switch's cost.
            Other groups: pipeline plans on tp-1 stage workers are re-laid out live
            (coordinator.adapt_relayout / relayout: drain, migrate by recompute, re-Assign,
            rebuild from host memory; ``plan_switch`` once done, with its cost); anything else
            -> ``replan_needs_relayout`` (with the reason, that plan and its predicted gain) and
            the best knobs *for the current layout* are applied instead.

After a switch the detector's reference becomes the observed law (it is what the new plan was
made for) and the dwell time starts, so one shift cannot flap the plan.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator import adapt_relayout
from coordinator.drift import DriftConfig, DriftDetector, Reference, observe, observed_spec
from coordinator.planner.plan import Plan


@dataclass(frozen=True)
class AdaptConfig:
    """What the adapter needs: the served plan, the profile it came from, the thresholds."""

    plan_path: str
    profile: str  # profile JSON path or analytic:GPU:MODEL[:DTYPE]
    drift: DriftConfig = field(default_factory=DriftConfig)
    replan_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if not self.profile:
            raise ValueError("--adapt needs --profile (the profile the plan was made from)")
        if not self.profile.startswith("analytic:") and not Path(self.profile).is_file():
            raise ValueError(f"--profile {self.profile!r} is not a file or analytic:GPU:MODEL")
        if self.replan_timeout_s <= 0:
            raise ValueError("replan_timeout_s must be > 0")


def knobs(plan: Plan) -> dict[str, Any]:
    """The knobs a plan sets that can change while serving."""
    return {"policy": plan.policy, "B_E": plan.B_E, "N_D": plan.N_D,
            "token_sum": plan.adjust.get("token_sum"),
            "decode_batch": plan.adjust.get("decode_batch")}


def layout(plan: Plan) -> tuple[Any, ...]:
    """What re-laying out would change: policy, worker groups, B_m (WAA decode pipeline)."""
    return (plan.policy, plan.worker_groups, plan.B_m if plan.policy.startswith("waa") else None)


EVAL_INTERVAL_S = 0.05


# ---- the background job (runs in a spawned process: plain values in and out) ---------------
def warm_up() -> None:
    """Import the planner in the pool's process before it is needed."""
    import coordinator.planner.planning  # noqa: F401
    import coordinator.planner.simulator  # noqa: F401


def replan_job(plan_json: str, profile_spec: str, workload_spec: str) -> dict[str, Any]:
    """Best plan for the observed workload (same policy, bound, SLA, workers), and, when that
    plan needs other worker groups, the best knobs on the served layout."""
    from coordinator.planner.analytic import parse_profile_arg
    from coordinator.planner.planning import make_plan
    from coordinator.planner.scheduler import InfeasibleBound
    from coordinator.planner.workload import parse_workload

    start = time.perf_counter()
    old = Plan.from_json(plan_json)
    profile = parse_profile_arg(profile_spec, old.profile_meta.get("dtype"))
    workload = parse_workload(workload_spec)
    out: dict[str, Any] = {"best": None, "on_layout": None, "infeasible": None}
    try:
        best = make_plan(workload, profile, old.num_workers, old.latency_bound_s,
                         policy=old.policy, sla=old.sla)
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
    replan_live) passes the workers that remain."""
    from coordinator.planner.candidate import Candidate, WorkloadStats
    from coordinator.planner.costs import Costs
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
    found: list[tuple[float, float, Any, Any]] = []  # (latency, seq/s, candidate, metrics)
    for b_e in batch_grid(512):
        for n_d in nds:
            cand = Candidate(old.policy, workers, old.search.get("tp", 1), tp_workers, b_e,
                             n_d, micro, num_encoders if old.policy.startswith("waa") else 0)
            m = simulate(cand, stats, costs)
            mem_ok = not m.worker_mem_bytes or max(m.worker_mem_bytes) <= m.mem_capacity_bytes
            if m.feasible and m.throughput_seq_s > 0 and mem_ok:
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
            plan = plan_from(cand, m, stats, profile, old.latency_bound_s, old.sla)
            if same(plan):
                if not meets:
                    plan.search["meets_bound"] = False
                return plan
    return None


# ---- the coordinator side -----------------------------------------------------------------
class Adapter:
    """Drift detector + background re-planner + live knob switch for one coordinator."""

    def __init__(self, cfg: AdaptConfig, coordinator: Any, log: Any) -> None:
        from coordinator.planner.workload import parse_workload

        self.cfg, self.co, self.log = cfg, coordinator, log
        try:
            self.plan = Plan.from_json(Path(cfg.plan_path).read_text())
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"--adapt: cannot read plan {cfg.plan_path}: {exc}") from exc
        try:
            planned = parse_workload(self.plan.workload)
        except ValueError as exc:
            raise ValueError(f"--adapt: the plan's workload {self.plan.workload!r} cannot be "
                             f"read here ({exc}); re-plan with a preset or inline spec") from exc
        self.detector = DriftDetector(Reference.from_workload(planned), cfg.drift)
        self.step_ratios: deque[float] = deque(maxlen=cfg.drift.window)
        self.switches: list[dict[str, Any]] = []
        self.pending: dict[str, Any] | None = None
        self.relayouting: dict[str, Any] | None = None  # a re-layout in progress (its plan)
        self.relayouts = 0  # re-layouts started (each one's epoch)
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._last_eval = -float("inf")
        self.warm_s: float | None = None  # how long the planner process took to start
        self._ensure_pool()

    @classmethod
    def from_coordinator(cls, coordinator: Any, log: Any) -> Adapter | None:
        cfg = coordinator.cfg
        if not cfg.adapt:
            return None
        if not cfg.plan:
            raise ValueError("--adapt needs --plan (the plan this mesh serves)")
        return cls(AdaptConfig(cfg.plan, cfg.profile or "", DriftConfig.parse(cfg.adapt_options)),
                   coordinator, log)

    # ---- observations (the coordinator's hooks) ------------------------------------------
    def observe_arrival(self, request: Any) -> None:
        tokens = request.tokens
        self.detector.window.arrive(request.req_id, request.num_prompt_tokens, tokens.__len__)
        self._maybe_evaluate(time.time())

    def observe_finish(self, request: Any, exact: bool = True) -> None:
        self.detector.window.finish(request.req_id, len(request.tokens), exact)
        times, tpot = request.times, self.plan.predicted.get("tpot_s")
        if exact and tpot and times.t_first_token and times.t_finish and len(request.tokens) > 1:
            measured = (times.t_finish - times.t_first_token) / (len(request.tokens) - 1)
            self.step_ratios.append(measured / tpot)

    def tick(self, now: float) -> None:
        """The heartbeat: evaluate if arrivals stopped short of it; re-plan timeout."""
        self._maybe_evaluate(now)
        if self.pending is not None and now - self.pending["t_fire"] > self.cfg.replan_timeout_s:
            self.log.warning("replan_timeout", seconds=self.cfg.replan_timeout_s)
            spec, self.pending = self.pending["spec"], None
            self._close_pool()
            self._rebase(now, spec)

    def _maybe_evaluate(self, now: float) -> None:
        """Every ``eval_every`` arrivals, at most every EVAL_INTERVAL_S (an evaluation costs
        ~2 ms of the event loop); on drift start the background re-plan."""
        det = self.detector
        if not det.due() or now - self._last_eval < EVAL_INTERVAL_S or self.relayouting:
            return  # (a re-layout in progress: its plan is not serving yet)
        self._last_eval = now
        if det.evaluate(now) and self.pending is None:
            self._start_replan(now)

    def _start_replan(self, now: float) -> None:
        det = self.detector
        assert det.last is not None
        spec = observed_spec(det.last, det.window)
        since = det.suspect_since or (now, det.window.arrivals)
        self.pending = {"t_fire": now, "t_mono": time.perf_counter(), "spec": spec,
                        "plan": self.plan,
                        "reasons": list(det.reasons), "detect_s": now - since[0],
                        "detect_requests": det.window.arrivals - since[1],
                        "detect_arrival": det.window.arrivals,
                        "observed": det.last.to_dict()}
        self.log.info("drift_detected", reasons=det.reasons, observed=det.last.to_dict())
        future = asyncio.get_running_loop().run_in_executor(
            self._ensure_pool(), replan_job, self.plan.to_json(), self.cfg.profile, spec)
        future.add_done_callback(self._replanned)

    def _replanned(self, future: asyncio.Future[dict[str, Any]]) -> None:
        """Runs on the event loop thread, between pumps: a batch boundary."""
        pending, self.pending = self.pending, None
        if pending is None or future.cancelled():
            return
        now = time.time()
        if pending.get("plan", self.plan) is not self.plan:  # workers lost/joined meanwhile
            self.log.info("replan_discarded", reasons=pending["reasons"],
                          why="the served plan changed (coordinator.replan_live)")
            self._rebase(now, pending["spec"])
            return
        try:
            result = future.result()
        except Exception as exc:  # noqa: BLE001 - a failed re-plan keeps the served plan
            self.log.warning("replan_failed", error=repr(exc), reasons=pending["reasons"])
            self._rebase(now, pending["spec"])
            return
        self.apply(result, pending, now)

    def apply(self, result: dict[str, Any], pending: dict[str, Any], now: float) -> None:
        best = Plan.from_json(result["best"]) if result["best"] else None
        fit = Plan.from_json(result["on_layout"]) if result["on_layout"] else None
        cost = {"detect_s": round(pending["detect_s"], 3),
                "detect_requests": pending["detect_requests"],
                "detect_arrival": pending["detect_arrival"],
                "replan_s": round(time.perf_counter() - pending["t_mono"], 3),
                "search_s": round(result["seconds"], 3), "pause_s": 0.0}
        if best is not None and layout(best) != layout(self.plan):
            target = (adapt_relayout.relayout_target(self.co, self.plan, best)
                      if self.cfg.drift.relayout
                      else "re-layout is off (adapt option relayout=0)")
            if not isinstance(target, str):
                adapt_relayout.start(self, best, target, self._event(best, pending, cost, now))
                self._rebase(now, pending["spec"])
                return
            self.log.warning("replan_needs_relayout", plan=best.to_dict(),
                             throughput_gain=_gain(best, fit), kept_layout=True,
                             relayout_unsupported=target)
        new = best if best is not None and layout(best) == layout(self.plan) else fit
        if new is None:
            self.log.warning("replan_no_plan", reasons=pending["reasons"],
                             infeasible=result["infeasible"])
        elif knobs(new) == knobs(self.plan):
            self.log.info("replan_no_change", reasons=pending["reasons"], knobs=knobs(new), **cost)
        else:
            old = self.plan
            apply_knobs(self.co, new)
            self.plan = new
            cost["switch_s"] = round(now - pending["t_fire"], 3)
            event = self._event(new, pending, cost, now, old)
            event.pop("t_fire")
            self.switches.append(event)
            self.log.info("plan_switch", **event, plan=new.to_dict())
            metrics = getattr(self.co, "metrics", None)
            if metrics is not None:  # stats compare with the new plan's predictions from now
                metrics.set_plan(new.to_dict(), event)
        self._rebase(now, pending["spec"])

    def _event(self, new: Plan, pending: dict[str, Any], cost: dict[str, Any], now: float,
               old: Plan | None = None) -> dict[str, Any]:
        old = old or self.plan
        return {"reason": "; ".join(pending["reasons"]), "old": knobs(old), "new": knobs(new),
                "t": now, "t_fire": pending["t_fire"], "relayout": None,
                "meets_bound": new.search.get("meets_bound", True),
                "predicted_old": _pred(old), "predicted_new": _pred(new), **cost}

    def _rebase(self, now: float, spec: str | None = None) -> None:
        from coordinator.planner.workload import parse_workload

        ref = self.detector.reference
        if spec is not None:
            ref = Reference.from_workload(parse_workload(spec), n=len(self.detector.window))
        self.detector.rebase(ref, now)

    # ---- reporting / shutdown --------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """The ``adapt`` stats: detector state, the window now (fresh, not the last
        evaluation) beside the plan's law, as a workload spec too; knobs and switches."""
        det, ratios = self.detector, list(self.step_ratios)
        detector, spec = det.describe(), None
        if len(det.window) >= det.cfg.min_samples:
            obs = observe(det.window, det.reference)
            detector["observed"], spec = obs.to_dict(), observed_spec(obs, det.window)
        pipeline = getattr(self.co, "pipeline", None)
        live = {"B_E": self.co.sizer.plan_batch, "streams": [
            {"batch": s.knobs.batch, "n_d": s.knobs.n_d} for s in pipeline.streams]
            if pipeline is not None else None}
        return {"detector": detector, "observed_spec": spec, "knobs": knobs(self.plan),
                "live": live,
                "switches": [{k: v for k, v in s.items()} for s in self.switches],
                "replanning": self.pending is not None, "planner_warm_s": self.warm_s,
                "relayout": (pipeline.switch.describe() if pipeline is not None
                             and pipeline.switch is not None else None),
                "step_time_ratio": {"median": statistics.median(ratios) if ratios else None,
                                    "count": len(ratios)},
                "workload_spec": self.plan.workload}

    def _ensure_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        """One spawned planner process (spawn: the coordinator's ZeroMQ threads must not be
        forked), started and warmed up (imports) ahead of the first drift."""
        if self._pool is None:
            start = time.perf_counter()
            self._pool = planner_pool(  # on the pool's thread: one store
                lambda: setattr(self, "warm_s", time.perf_counter() - start))
        return self._pool

    def close(self) -> None:
        self._close_pool()

    def _close_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            stop_planner_pool(pool)


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


def apply_knobs(co: Any, plan: Plan) -> None:
    """Install a plan's knobs in the running coordinator (on its loop thread, so between two
    batches): WAA's BatchSizer; pipeline streams' B and N_D (RRA: from the next cycle)."""
    from coordinator.adjust import Band, BatchSizer

    ts, db = plan.adjust.get("token_sum"), plan.adjust.get("decode_batch")
    co.sizer = BatchSizer(plan.B_E, cap=co.sizer.cap, token_sum=Band(*ts) if ts else None,
                          decode_batch=Band(*db) if db else None)
    pipeline = getattr(co, "pipeline", None)
    if pipeline is not None:
        from coordinator.streams import StreamKnobs

        for stream in pipeline.streams:
            stream.knobs = StreamKnobs(stream.knobs.policy, plan.B_E, plan.N_D or 1)


def _pred(plan: Plan) -> dict[str, Any]:
    p = plan.predicted
    return {"throughput_seq_s": p.get("throughput_seq_s"), "latency_s": p.get(
        "latency_p99len_s" if plan.sla == "b" else "latency_p99_s")}


def _gain(best: Plan, fit: Plan | None) -> float | None:
    if fit is None or not fit.predicted.get("throughput_seq_s"):
        return None
    return best.predicted["throughput_seq_s"] / fit.predicted["throughput_seq_s"] - 1.0
