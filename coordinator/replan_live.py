"""Re-planning for the workers that remain: after a worker loss, and again when one joins.

    Membership.lose(group) / on_ready(worker), while serving
        --> LiveReplanner.changed(kind, worker)    generation += 1; one re-plan DEBOUNCE_S
                                                    after the first change (a burst: one)
        --> _fire: the READY workers per role       impossible? -> ``replan_skipped`` (why)
        --> live_replan_job in a spawned planner process (coordinator.adapt_replan.planner_pool):
            the best knobs of the served plan's policy, bound, SLA and workload on the live
            layout (E encoders, D decoders: the WAA split fixed to what is alive)
        --> done callback on the loop thread: the worker set changed since? -> discarded
            (the newer change has its own re-plan) ``replan_discarded``
        --> new knobs go live at once (coordinator.adapt_knobs.apply_knobs: a new BatchSizer, the
            next encode batch uses it; no pause); the plan for the live layout becomes the
            served plan (the adapter re-plans from it, stats compare with its predictions)
        log ``replan_after_loss`` / ``replan_after_join``: live counts, old/new knobs,
        predicted old/new, replan_s (change -> result), search_s, outcome
        (switched | confirmed | no_plan)

Only WAA meshes of whole-model encoder and decoder workers can be re-planned around a loss:
a pipeline stage (RRA/static/continuous, staged WAA) holds layers nobody else has, so its
loss leaves no servable layout to plan for (``replan_skipped`` says so; re-laying out is
coordinator/relayout.py's job, not attempted here). Without ``--plan`` and ``--profile``
there is nothing to re-plan from: ``replan_skipped`` once, the knobs stay.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

from coordinator import layout_state
from coordinator.planner.plan import Plan

# coordinator.adapt is imported where used: it pulls in scipy (drift tests), which a
# coordinator that never loses a worker should not pay for at startup

DEBOUNCE_S = 1.0  # changes within this of the first one make one re-plan
TIMEOUT_S = 120.0  # a search still running this long when the next one fires is abandoned
WAA_POLICIES = ("waa-c", "waa-m")
RECENT = 8  # re-plan events kept for stats


# ---- the background job (runs in a spawned process: plain values in and out) ---------------
def role_counts(plan: Plan) -> tuple[int, int]:
    """(encoder workers, decoder workers) of a WAA plan."""
    return (sum(g.count for g in plan.groups("encoder")),
            sum(g.count for g in plan.groups("decoder")))


def live_replan_job(plan_json: str, profile_spec: str, num_encoders: int, num_decoders: int,
                    num_tp_workers: int) -> dict[str, Any]:
    """The best knobs of the served plan (policy, bound, SLA, workload) on ``num_encoders``
    encoder and ``num_decoders`` decoder workers; None when nothing fits in memory."""
    from coordinator.adapt_replan import best_on_layout
    from coordinator.planner.analytic import parse_profile_arg
    from coordinator.planner.workload import parse_workload

    start = time.perf_counter()
    old = Plan.from_json(plan_json)
    profile = parse_profile_arg(profile_spec, old.profile_meta.get("dtype"))
    workload = parse_workload(old.workload)
    want = (num_encoders, num_decoders)
    # the split is what is alive, not a WAA-C/M choice from B_E (the cost model holds for any)
    fit = best_on_layout(old, workload, profile, num_workers=sum(want),
                         num_tp_workers=num_tp_workers, b_m=min(old.B_m or 1, num_decoders),
                         num_encoders=num_encoders, same=lambda plan: role_counts(plan) == want)
    return {"on_layout": fit.to_json() if fit is not None else None,
            "seconds": time.perf_counter() - start}


# ---- the coordinator side -----------------------------------------------------------------
def skip_reason(co: Any) -> tuple[Plan | None, str | None]:
    """The served plan, or why this mesh cannot be re-planned around a lost worker."""
    cfg = co.cfg
    if co.pipeline is not None:
        kind = "staged WAA" if cfg.policy == "waa" else f"{cfg.policy} pipeline"
        return None, (f"{kind} plan: a lost stage's layers are held by no other worker, so "
                      "no layout of the remaining workers serves the model")
    if not cfg.plan or not cfg.profile:
        return None, (f"no --{'plan' if not cfg.plan else 'profile'}: nothing to re-plan "
                      "from (serve with --plan and --profile); the knobs stay")
    if not cfg.profile.startswith("analytic:") and not Path(cfg.profile).is_file():
        return None, f"--profile {cfg.profile!r} is not a file or analytic:GPU:MODEL"
    try:
        plan = Plan.from_json(Path(cfg.plan).read_text())
    except (OSError, KeyError, TypeError, ValueError) as exc:
        return None, f"cannot read --plan {cfg.plan}: {exc}"
    if plan.policy not in WAA_POLICIES:
        return None, f"the plan's policy {plan.policy!r} is not WAA"
    return plan, None


class LiveReplanner:
    """Debounced background re-plan on worker loss/join, applied live (module docstring)."""

    def __init__(self, co: Any, log: Any, plan: Plan | None, profile: str | None,
                 skip: str | None) -> None:
        self.co, self.log = co, log
        self.plan, self.profile, self.skip = plan, profile, skip
        self.generation = 0  # bumped by every loss/join: a result for an older one is stale
        self.counts: Counter[str] = Counter()
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self._changes: list[dict[str, Any]] = []  # since the last fire
        self._timer: asyncio.TimerHandle | None = None
        self._running: dict[int, float] = {}  # generation -> perf_counter at submit
        self._skips_logged: set[str] = set()
        self._pool: concurrent.futures.Executor | None = None

    @classmethod
    def from_coordinator(cls, co: Any, log: Any) -> LiveReplanner:
        plan, skip = skip_reason(co)
        return cls(co, log, plan, co.cfg.profile, skip)

    def served(self) -> Plan | None:
        """The plan serving now: the adapter's (it may have switched knobs), else ours."""
        adapter = getattr(self.co, "adapter", None)
        return adapter.plan if adapter is not None else self.plan

    # ---- triggers (Membership's hooks, on the loop thread) ---------------------------------
    def changed(self, kind: str, worker_id: str, role: str) -> None:
        """A worker (group) was lost (``loss``) or became READY (``join``) while serving."""
        if kind == "join":  # a replacement in a layout adopted live: record its process
            layout_state.refresh(self.co)
        self.generation += 1
        self.counts["losses" if kind == "loss" else "joins"] += 1
        if self.skip is not None:  # nothing to wait for
            self._skipped(f"replan_after_{kind}", self.skip, self.live())
            return
        self._changes.append({"kind": kind, "worker": worker_id, "role": role,
                              "t_mono": time.perf_counter()})
        self._ensure_pool()  # the planner process starts during the debounce
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(DEBOUNCE_S, self._fire)

    def live(self) -> dict[str, Any]:
        """READY workers per role, and the tp sizes of their groups."""
        members = self.co.members
        enc, dec = members.ready("encoder"), members.ready("decoder")
        tps = sorted({w.tp_size for w in enc + dec if w.tp_size > 1})
        return {"encoders": len(enc), "decoders": len(dec), "tp_sizes": tps,
                "num_tp_workers": sum(1 for w in enc + dec if w.tp_size > 1)}

    def _cannot(self, live: dict[str, Any], plan: Plan) -> str | None:
        for role in ("encoders", "decoders"):
            if not live[role]:
                return f"no {role[:-1]} worker is left"
        tp = plan.search.get("tp", 1)
        if live["tp_sizes"] and live["tp_sizes"] != [tp]:
            return f"TP groups of sizes {live['tp_sizes']} do not match the plan's tp={tp}"
        if live["num_tp_workers"] % tp:
            return "a TP group is not complete yet"
        return None

    def _fire(self) -> None:
        self._timer = None
        changes, self._changes = self._changes, []
        event = f"replan_after_{changes[-1]['kind'] if changes else 'loss'}"
        live, plan = self.live(), self.served()
        why = self._cannot(live, plan) if plan is not None else "no plan"
        if why is not None or plan is None:
            self._skipped(event, str(why), live)
            return
        self._abandon_stuck()
        ctx = {"event": event, "generation": self.generation, "live": live, "plan": plan,
               "workers": [c["worker"] for c in changes],
               "t_mono": changes[0]["t_mono"] if changes else time.perf_counter()}
        self._running[self.generation] = time.perf_counter()
        future = asyncio.get_running_loop().run_in_executor(
            self._ensure_pool(), live_replan_job, plan.to_json(), self.profile,
            live["encoders"], live["decoders"], live["num_tp_workers"])
        future.add_done_callback(lambda f: self._done(ctx, f))

    def _skipped(self, event: str, why: str, live: dict[str, Any]) -> None:
        self.counts["replan_skipped"] += 1
        if why not in self._skips_logged:  # the same reason once, not per loss
            self._skips_logged.add(why)
            self.log.warning("replan_skipped", trigger=event, why=why,
                             encoders=live["encoders"], decoders=live["decoders"])

    def _abandon_stuck(self) -> None:
        now = time.perf_counter()
        if self._pool is not None and any(now - t > TIMEOUT_S for t in self._running.values()):
            self.log.warning("replan_timeout", seconds=TIMEOUT_S)
            self._running.clear()
            self.close()

    # ---- the result (done callback, on the loop thread: between two batches) ---------------
    def _done(self, ctx: dict[str, Any], future: asyncio.Future[dict[str, Any]]) -> None:
        self._running.pop(ctx["generation"], None)
        if future.cancelled():
            return
        if ctx["generation"] != self.generation or self.served() is not ctx["plan"]:
            self.counts["replan_discarded"] += 1
            self.log.info("replan_discarded", trigger=ctx["event"], live=ctx["live"],
                          why="the worker set or the served plan changed meanwhile")
            return
        try:
            result = future.result()
        except Exception as exc:  # noqa: BLE001 - a failed re-plan keeps the knobs
            self.counts["replan_failed"] += 1
            self.log.warning("replan_failed", trigger=ctx["event"], error=repr(exc))
            return
        self.apply(ctx, result)

    def apply(self, ctx: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        """Install the knobs for the live layout (when they differ) and log the event."""
        from coordinator.adapt_knobs import apply_knobs, pred
        from coordinator.adapt_replan import knobs

        old = ctx["plan"]
        new = Plan.from_json(result["on_layout"]) if result["on_layout"] else None
        live = ctx["live"]
        record = {"encoders": live["encoders"], "decoders": live["decoders"],
                  "workers": ctx["workers"], "old": knobs(old),
                  "new": knobs(new) if new is not None else None,
                  "predicted_old": pred(old),
                  "predicted_new": pred(new) if new is not None else None,
                  "meets_bound": new.search.get("meets_bound", True) if new else None,
                  "replan_s": round(time.perf_counter() - ctx["t_mono"], 3),
                  "search_s": round(result["seconds"], 3), "pause_s": 0.0, "t": time.time()}
        if new is None:
            record["outcome"] = "no_plan"  # nothing fits in memory: the knobs stay
        elif knobs(new) == knobs(old):
            record["outcome"] = "confirmed"
        else:
            apply_knobs(self.co, new)
            record["outcome"] = "switched"
        if new is not None:
            self._install(new, ctx["event"], record)
        self.counts[ctx["event"]] += 1
        self.recent.append({"event": ctx["event"], **record})
        (self.log.warning if new is None else self.log.info)(ctx["event"], **record)
        return record

    def _install(self, new: Plan, event: str, record: dict[str, Any]) -> None:
        """The live layout's plan serves from now on: the adapter re-plans from it (its
        worker count) and the stats compare with its predictions."""
        self.plan = new
        adapter = getattr(self.co, "adapter", None)
        if adapter is not None:
            adapter.plan = new
        metrics = getattr(self.co, "metrics", None)
        if metrics is not None:
            metrics.set_plan(new.to_dict(), {"reason": event, "t": record["t"],
                                             "old": record["old"], "new": record["new"],
                                             "replan_s": record["replan_s"]})

    # ---- reporting / shutdown --------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """The stats' ``membership``: losses/joins seen and what their re-plans did."""
        names = ("losses", "joins", "replan_after_loss", "replan_after_join",
                 "replan_skipped", "replan_discarded", "replan_failed")
        return {**{name: self.counts[name] for name in names},
                "replanning": self._timer is not None or bool(self._running),
                "skip": self.skip, "recent": list(self.recent)}

    def _ensure_pool(self) -> concurrent.futures.Executor:
        if self._pool is None:
            from coordinator.adapt_replan import planner_pool

            self._pool = planner_pool()
        return self._pool

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pool, self._pool = self._pool, None
        if isinstance(pool, concurrent.futures.ProcessPoolExecutor):
            from coordinator.adapt_replan import stop_planner_pool

            stop_planner_pool(pool)
        elif pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
