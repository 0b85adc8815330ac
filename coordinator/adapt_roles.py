"""A live change of a WAA mesh's encoder/decoder split: workers switch role while serving.

A new WAA plan may want another split of the same workers (e.g. 2 encoders + 2 decoders
instead of 1 + 3: the WAA-C/M rule follows the workload). On a mesh of whole-model workers
(each encoder or decoder holds its role's whole model, tp 1) the surplus workers of one role
switch to the other, one ``RoleSwitch`` for all of them::

    DRAIN    a moving worker leaves the ready set (no new batch / placement); the rest of the
             mesh serves on. An encoder finishes its batches: done when every request it
             encoded has reached its decoder (first token seen). A decoder decodes for up to
             ``drain_timeout_s``; what it still holds is MIGRATED: released and re-queued
             under a new wire id, re-encoded from prompt + the tokens the client already has
             (the worker-loss re-run; a stale token of the old run cannot reach the request;
             an encoder-decoder (T5) request re-runs from its prompt and replays the streamed
             tokens, coordinator/requests.py)
    SWITCH   Assign(role=new, config["role_switch"]=epoch) on the worker's ordered pipe; the
             worker closes its old backend and builds the new role's one from its host-memory
             weights (common.roleswitch, common.weightstore), then says Ready
    DONE     every moved worker READY in its new role: encoders learn the new decoders; the
             plan (its groups served whole) is adopted and, with every worker's role and
             capacity, written to the layout state (apply_knobs -> coordinator.layout_state:
             a restarted coordinator serves this split and plan), ``plan_switch`` logged

No request is dropped or duplicated: a request is on its old worker, in the queue, or on a
new run, never two; the last worker of a role never moves (the new plan has >= 1 of each).
Not here: staged WAA meshes (stage layer ranges: coordinator.relayout.WaaRelayout re-lays them
out). Not live: tp_size > 1 workers, an encoder started without a KV endpoint (it cannot become
a decoder): ``relayout_unsupported`` with the reason.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from coordinator.planner.plan import Plan, WorkerGroup
from coordinator.registry import WorkerInfo, WorkerState
from coordinator.replan_live import role_counts

ENCODER_DRAIN_LIMIT_S = 30.0  # an encoder's queued batches should be done well before this


@dataclass(frozen=True)
class RoleTarget:
    """Which workers move to which role, and the plan as the mesh will serve it."""

    moves: tuple[tuple[str, str], ...]  # (worker id, new role)
    plan: Plan  # the new plan, its groups as this mesh serves them (whole-model workers)


def roles_target(co: Any, old: Plan, new: Plan) -> RoleTarget | str:
    """The role switches that give the served mesh the new plan's split, or why not."""
    if not new.policy.startswith("waa") or not old.policy.startswith("waa"):
        return "a switch between the WAA and pipeline families"
    if getattr(co, "pipeline", None) is not None:
        return ("the served WAA mesh is staged (layer ranges per worker): a re-layout "
                "(coordinator.adapt_relayout), not a role switch")
    if any(g.tp_size != 1 for g in new.worker_groups):
        return "the new plan has tensor-parallel groups (tp_size > 1): TP groups form at launch"
    workers = [w for w in co.members.registry if w.role in ("encoder", "decoder")]
    if any(w.tp_size != 1 for w in workers):
        return "the served workers are tensor-parallel: TP groups form at launch"
    if getattr(co.adapter, "roles", None) is not None:
        return "a role switch is already in progress"
    ready = [w for w in workers if w.state is WorkerState.READY]
    want = role_counts(new)
    if sum(want) != len(ready) or len(ready) != len(workers):
        return (f"the new plan has {sum(want)} workers, {len(ready)} of {len(workers)} "
                "connected workers are ready")
    have = sum(w.role == "encoder" for w in ready)
    if want[0] == have:
        return "same encoder/decoder split (only stage ranges or B_m differ): not live"
    if want[0] > have:  # decoders become encoders: the least loaded first
        pool = sorted((w for w in ready if w.role == "decoder"), key=lambda w: w.num_active)
        moves = tuple((w.worker_id, "encoder") for w in pool[:want[0] - have])
    else:
        pool = sorted((w for w in ready if w.role == "encoder" and w.kv_endpoint),
                      key=lambda w: w.outstanding_batches)
        if len(pool) < have - want[0]:
            return ("encoders without a KV endpoint cannot become decoders (start them with "
                    "--kv-bind; `exegpt serve --adapt` does)")
        moves = tuple((w.worker_id, "decoder") for w in pool[:have - want[0]])
    return RoleTarget(moves, served_plan(new, want, co.model))


def served_plan(new: Plan, counts: tuple[int, int], model: Any) -> Plan:
    """The plan with one whole-model group per role (how this mesh serves it)."""
    enc = int(getattr(model, "num_encoder_layers", 0) or 0)
    layers = int(model.num_layers)
    groups = (WorkerGroup("encoder", counts[0], 1, (0, 0) if enc else (0, layers),
                          (0, enc) if enc else None),
              WorkerGroup("decoder", counts[1], 1, (0, layers)))
    return dataclasses.replace(new, worker_groups=groups)


class RoleSwitch:
    """One change of split (phases: module docstring); stepped by the adapter's tick."""

    def __init__(self, co: Any, target: RoleTarget, epoch: int, drain_timeout_s: float,
                 on_done: Callable[[dict[str, Any]], None],
                 ready_timeout_s: float = 120.0) -> None:
        self.co, self.target, self.epoch, self.on_done = co, target, epoch, on_done
        self.drain_timeout_s, self.ready_timeout_s = drain_timeout_s, ready_timeout_s
        self.t0 = time.perf_counter()
        self.phase: dict[str, str] = {}  # worker id -> drain | switch | ready
        self.over = False  # finished or failed: on_done has run (once)
        self.t_sent: dict[str, float] = {}
        self.reload_s: dict[str, float] = {}
        self.out_s: dict[str, float] = {}  # drain start -> Ready in the new role
        self.cost: dict[str, Any] = {"migrated_requests": 0, "rerun_tokens": 0,
                                     "drained_requests": 0, "moves": dict(target.moves)}
        for worker_id, _ in target.moves:
            info = co.members.registry.get(worker_id)
            assert info is not None
            self.cost["drained_requests"] += len(co.table.held_by(worker_id))
            info.state = WorkerState.ASSIGNED  # out of placement; encoders keep its KV route
            co.members.draining.add(worker_id)
            self.phase[worker_id] = "drain"

    @property
    def waiting(self) -> list[str]:
        return sorted(w for w, p in self.phase.items() if p != "ready")

    def step(self) -> None:
        """Drain what can go, switch what is drained, finish or fail."""
        if self.over:
            return
        elapsed = time.perf_counter() - self.t0
        for worker_id, phase in list(self.phase.items()):
            info = self.co.members.registry.get(worker_id)
            if info is None:
                self._fail(f"worker {worker_id} was lost during the role switch")
                return
            if phase == "drain" and self._drained(info, elapsed):
                self._switch(info)
            elif phase == "switch" and time.perf_counter() - self.t_sent[worker_id] > \
                    self.ready_timeout_s:
                self._fail(f"{worker_id} did not say Ready within {self.ready_timeout_s:g} s")
                return
        if not self.waiting:
            self._finish()

    def _drained(self, info: WorkerInfo, elapsed: float) -> bool:
        """Nothing left on the worker, or its time is up (then migrate what is left)."""
        held = self.co.table.held_by(info.worker_id)
        limit = self.drain_timeout_s if info.role == "decoder" else ENCODER_DRAIN_LIMIT_S
        if held and elapsed <= limit:
            return False
        for request in held:  # the worker-loss re-run: new wire id, the tokens streamed kept
            self.co.members.release(request, cancel=True,
                                    encoding=request.encoder == info.worker_id)
            self.co.table.requeue(request)
            self.cost["migrated_requests"] += 1
            self.cost["rerun_tokens"] += len(request.tokens)
        return True

    def _switch(self, info: WorkerInfo) -> None:
        """Give the drained worker its new role (it rebuilds, then says Ready)."""
        new_role = dict(self.target.moves)[info.worker_id]
        members = self.co.members
        peers = [w for w in members.registry if w.role == new_role and w.worker_id not in
                 self.phase]
        members.draining.discard(info.worker_id)
        old_role = info.role
        if old_role == "decoder":
            members._update_encoders()  # it is no decoder now: encoders drop its route
        info.role = new_role
        if peers:
            info.capacity = peers[0].capacity  # the role's capacity, as launched
        info.num_active = info.outstanding_batches = info.batches_sent = 0
        info.load = {}
        assign = members._assign(info)
        config = {**assign.config, "role_switch": self.epoch, "capacity": info.capacity}
        members.send(info, dataclasses.replace(assign, config=config))
        self.phase[info.worker_id] = "switch"
        self.t_sent[info.worker_id] = time.perf_counter()
        self.cost.setdefault("drain_s", {})[info.worker_id] = round(
            time.perf_counter() - self.t0, 4)
        self.co.log.info("role_switch_assign", epoch=self.epoch, worker=info.worker_id,
                         old_role=old_role, new_role=new_role, capacity=info.capacity)

    def on_ready(self, worker: WorkerInfo, info: dict[str, Any]) -> bool:
        """A moved worker's Ready in its new role (True: it was one of ours)."""
        if self.over or info.get("role_switch") != self.epoch or \
                self.phase.get(worker.worker_id) != "switch":
            return False
        self.phase[worker.worker_id] = "ready"
        self.reload_s[worker.worker_id] = float(info.get("reload_s", 0.0))
        self.out_s[worker.worker_id] = round(time.perf_counter() - self.t0, 4)
        if not self.waiting:
            self._finish()  # now, not at the next tick
        return True

    def _finish(self) -> None:
        end = time.perf_counter()
        self.over = True
        self.cost.update({
            "reload_s": round(max(self.reload_s.values(), default=0.0), 4),
            "reload_s_per_worker": {k: round(v, 4) for k, v in self.reload_s.items()},
            "worker_out_s": self.out_s,  # each moved worker out of service
            "switch_total_s": round(end - self.t0, 4),
            # the mesh never stops: the other workers serve throughout (>= 1 of each role)
            "pause_s": 0.0,
            "counts": list(role_counts(self.target.plan))})
        self.phase = {}
        self.on_done({"ok": True, **self.cost})

    def _fail(self, why: str) -> None:
        self.over = True
        for worker_id in self.phase:
            self.co.members.draining.discard(worker_id)
            info = self.co.members.registry.get(worker_id)
            if info is not None and self.phase[worker_id] == "drain":
                info.state = WorkerState.READY  # not switched yet: back in service
        self.phase = {}
        self.co.log.error("role_switch_failed", epoch=self.epoch, error=why)
        self.on_done({"ok": False, "error": why, **self.cost})

    def describe(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "elapsed_s": round(time.perf_counter() - self.t0, 3),
                "phases": dict(self.phase), **self.cost}


def start(adapter: Any, target: RoleTarget, event: dict[str, Any]) -> None:
    """Start the switch; ``plan_switch`` is logged (and the plan adopted) once it is done."""
    co = adapter.co
    adapter.relayouts += 1
    epoch = adapter.relayouts
    old_counts = list(role_counts(adapter.plan))

    def done(cost: dict[str, Any]) -> None:
        adapter.roles = None
        finish(adapter, target.plan, {**event, "old_counts": old_counts}, cost)

    adapter.roles = RoleSwitch(co, target, epoch, adapter.cfg.drift.drain_timeout_s, done)
    co.log.info("role_switch_start", epoch=epoch, reason=event["reason"], moves=dict(
        target.moves), old_counts=old_counts, new_counts=list(role_counts(target.plan)))
    adapter.roles.step()  # an idle worker switches at once


def finish(adapter: Any, new: Plan, event: dict[str, Any], cost: dict[str, Any]) -> None:
    """Adopt the plan and log ``plan_switch`` with the switch's cost, or log why not."""
    from coordinator.adapt_knobs import apply_knobs

    co, switch = adapter.co, {k: v for k, v in cost.items() if k != "ok"}
    if not cost.get("ok"):
        co.log.error("relayout_failed", reason=event["reason"], kind="role_switch", **switch)
        return
    old = adapter.plan
    apply_knobs(co, new)
    adapter.plan = new
    now = time.time()
    event = {**event, "relayout": {"kind": "role_switch", **switch}, "pause_s": 0.0, "t": now,
             "switch_s": round(now - event["t_fire"], 3)}
    event.pop("t_fire", None)
    adapter.switches.append(event)
    co.log.info("plan_switch", **event, plan=new.to_dict(), old_plan=old.to_dict(),
                old_layout=list(role_counts(old)), new_layout=list(role_counts(new)))
    metrics = getattr(co, "metrics", None)
    if metrics is not None:
        metrics.set_plan(new.to_dict(), event)
    co.schedule()
