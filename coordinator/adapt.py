"""Adapting the served plan to the traffic: detect drift, re-plan in the background, switch knobs.

    observe_arrival(request)   admitted: input length; the request's live token count is read
                               at each evaluation (in-flight outputs = censored lengths);
                               every ``eval_every`` arrivals (at most every 50 ms) evaluate
                               (coordinator.drift); on drift start ONE re-plan
    observe_finish(request)    answered: its output length (exact, or a lower bound if failed)
                               and its time per token / the plan's TPOT (reported only)
    tick(now)                  the coordinator's heartbeat: a role switch's next step;
                               evaluate if arrivals stopped short of a due evaluation; give up
                               a re-plan after its timeout

    drift --> replan_job (coordinator.adapt_replan; ProcessPoolExecutor, spawn: the planner's
              numpy/scipy search never blocks the event loop) --> done callback on the loop
              thread --> apply
    apply:  same worker groups (roles, counts, tp_size, layer ranges) -> the new knobs go live
            at once: B_E and the adjustment bands (a new BatchSizer: the next encode batch uses
            it), pipeline plans' B and N_D (each stream's knobs: its next pass / RRA cycle);
            logged ``plan_switch`` with the reason, old and new knobs and the switch's cost.
            Other groups: pipeline plans on tp-1 stage workers are re-laid out live
            (coordinator.adapt_relayout / relayout: drain, migrate by recompute, re-Assign,
            rebuild from host memory; ``plan_switch`` once done, with its cost); a WAA mesh of
            whole-model tp-1 workers changes its encoder/decoder split by switching workers'
            roles live (coordinator.adapt_roles: drain, migrate, re-Assign); anything else
            -> ``replan_needs_relayout`` (with the reason, that plan and its predicted gain) and
            the best knobs *for the current layout* are applied instead.

After a switch the detector's reference becomes the observed law (it is what the new plan was
made for) and the dwell time starts, so one shift cannot flap the plan.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator import adapt_relayout, adapt_roles
from coordinator.adapt_knobs import apply_knobs, gain, pred
from coordinator.adapt_replan import (  # noqa: F401 - re-exported (callers, tests)
    best_on_layout,
    knobs,
    layout,
    planner_pool,
    profile_correction,
    replan_job,
    stop_planner_pool,
)
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


EVAL_INTERVAL_S = 0.05

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
        self.step_ratios: deque[float] = deque(maxlen=cfg.drift.window)  # under self.plan
        self.ratio_reference: float | None = None  # their median once the plan served enough
        self._ratio_plan = self.plan
        self.switches: list[dict[str, Any]] = []
        self.pending: dict[str, Any] | None = None
        self.relayouting: dict[str, Any] | None = None  # a re-layout in progress (its plan)
        self.relayouts = 0  # re-layouts and role switches started (each one's epoch)
        self.roles: adapt_roles.RoleSwitch | None = None  # a WAA role switch in progress
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
            if self._ratio_plan is not self.plan:  # a switch: ratios to the new prediction
                self.step_ratios.clear()
                self.ratio_reference, self._ratio_plan = None, self.plan
            self.step_ratios.append(measured / tpot)
            if self.ratio_reference is None and \
                    len(self.step_ratios) >= self.cfg.drift.min_samples:
                self.ratio_reference = statistics.median(self.step_ratios)

    def tick(self, now: float) -> None:
        """The heartbeat: a role switch's next step; evaluate if arrivals stopped short of
        it; re-plan timeout."""
        if self.roles is not None:
            self.roles.step()
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
        if not det.due() or now - self._last_eval < EVAL_INTERVAL_S or self.relayouting or \
                self.roles is not None:
            return  # (a re-layout / role switch in progress: its plan is not serving yet)
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
        scale = profile_correction(self.step_ratios, self.ratio_reference,
                                   self.cfg.drift.ratio_shift, self.cfg.drift.min_samples)
        self.pending["profile_scale"] = scale
        self.log.info("drift_detected", reasons=det.reasons, observed=det.last.to_dict(),
                      profile_scale=scale, step_time_ratio_reference=self.ratio_reference)
        future = asyncio.get_running_loop().run_in_executor(
            self._ensure_pool(), replan_job, self.plan.to_json(), self.cfg.profile, spec, scale)
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
                "search_s": round(result["seconds"], 3), "pause_s": 0.0,
                "profile_scale": result.get("profile_scale")}
        if best is not None and layout(best) != layout(self.plan):
            target = self._relayout_target(best)
            if isinstance(target, adapt_roles.RoleTarget):  # WAA: workers switch role
                event = self._event(target.plan, pending, cost, now)
                adapt_roles.start(self, target, event)
                self._rebase(now, pending["spec"])
                return
            if not isinstance(target, str):
                adapt_relayout.start(self, best, target, self._event(best, pending, cost, now))
                self._rebase(now, pending["spec"])
                return
            self.log.warning("replan_needs_relayout", plan=best.to_dict(),
                             throughput_gain=gain(best, fit), kept_layout=True,
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

    def _relayout_target(self, best: Plan) -> Any:
        """A pipeline re-layout, a WAA role switch, or why the served layout must stay."""
        if not self.cfg.drift.relayout:
            return "re-layout is off (adapt option relayout=0)"
        if self.plan.policy.startswith("waa") and getattr(self.co, "pipeline", None) is None:
            return adapt_roles.roles_target(self.co, self.plan, best)
        return adapt_relayout.relayout_target(self.co, self.plan, best)

    def _event(self, new: Plan, pending: dict[str, Any], cost: dict[str, Any], now: float,
               old: Plan | None = None) -> dict[str, Any]:
        old = old or self.plan
        return {"reason": "; ".join(pending["reasons"]), "old": knobs(old), "new": knobs(new),
                "t": now, "t_fire": pending["t_fire"], "relayout": None,
                "meets_bound": new.search.get("meets_bound", True),
                "predicted_old": pred(old), "predicted_new": pred(new), **cost}

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
                "role_switch": self.roles.describe() if self.roles is not None else None,
                "step_time_ratio": {"median": statistics.median(ratios) if ratios else None,
                                    "count": len(ratios),
                                    "reference": self.ratio_reference},
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

