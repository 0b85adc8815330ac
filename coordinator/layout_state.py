"""The plan and layout being served, kept on disk so a restarted coordinator serves them again.

A live re-layout (coordinator.relayout, relayout_tp; adapt_relayout.finish) moves the stage
workers to other layer ranges, stages or TP groups; a role switch (adapt_roles) turns
whole-model WAA workers into the other role; a knob-only switch (adapt_knobs) changes B_E, N_D
and the thresholds. The workers keep their placement across a coordinator restart (docs/mesh.md,
"Coordinator restart") and a rejoining worker stops when the new instance assigns anything
else. A coordinator started again with its launch flags and the original ``--plan`` would
assign the launch layout (every moved worker would stop) and serve the launch plan's knobs
(until drift is detected again). Hence::

    switch committed   commit() / save(): the served plan, the stages, streams, epoch and every
                       worker's placement (stage, TP rank/size/group, or role and capacity;
                       pid) are written atomically (temp file, fsync, rename) to the state
                       file; the file format: coordinator/layout_file.py
    coordinator start  resume(): a state file for this model, this --plan and live workers
                       replaces the launch layout (log ``layout_state_resumed``); anything else
                       is ignored with ``layout_state_ignored`` and the reason: the workers
                       that no longer match stop and their supervisor restarts them in the
                       launch layout, which recovers service (a refusal to start would not)
    clean stop         clear(): the coordinator shut its workers down, nothing holds the layout

Where: ``EXEGPT_LAYOUT_STATE`` (a path, or ``off``), else ``<plan stem>.layout.json`` beside
``--plan``; only an adapting coordinator (``--adapt``) switches live, so only it reads or
writes."""

from __future__ import annotations

import dataclasses
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.config import CoordinatorConfig
from coordinator.layout_file import (  # noqa: F401 - the file's API, re-exported
    STATE_ENV,
    VERSION,
    LayoutState,
    Placement,
    apply,
    model_sha,
    plan_sha,
    read,
    state_path,
    write,
)


def worker_alive(pid: int, host: str) -> bool:
    """A worker process with this pid runs on this host (/proc: its command line)."""
    from coordinator.exitwatch import is_local_worker

    return is_local_worker(pid, host)


def mismatch(state: LayoutState, cfg: CoordinatorConfig, model: Any) -> str | None:
    """Why ``state`` cannot be the layout of this coordinator, or None when it can."""
    from coordinator.planner.plan import Plan
    from coordinator.planner.workload import parse_workload

    try:  # restore() needs the plan and its workload (the detector's reference)
        parse_workload(Plan.from_dict(state.plan).workload)
    except (KeyError, TypeError, ValueError) as exc:
        return f"its plan cannot be read: {exc!r}"
    if state.model_sha != model_sha(model):
        return "it was written for another model"
    if cfg.plan is None or state.plan_sha != plan_sha(cfg.plan):
        return f"it was written for another --plan than {cfg.plan}"
    if (state.policy == "waa") != (cfg.policy == "waa"):
        return f"it is a {state.policy} layout, this coordinator runs {cfg.policy}"
    launched = sum(g.count for g in Plan.from_json(Path(cfg.plan).read_text()).worker_groups)
    if len(state.workers) != launched:
        return f"it places {len(state.workers)} workers, --plan launches {launched}"
    host = socket.gethostname()
    for worker_id, place in sorted(state.workers.items()):
        if place.local and state.host == host and place.pid and not worker_alive(place.pid,
                                                                                 host):
            return (f"worker {worker_id} (pid {place.pid}) is gone: the state no longer "
                    "describes the live workers")
    return None


@dataclass(frozen=True)
class Resumed:
    """The state a coordinator started from; placements for its workers' Hellos."""

    path: Path
    state: LayoutState

    def placement(self, worker_id: str, pid: int, tp_rank: int,
                  tp_size: int) -> Placement | None:
        """The recorded place of the process saying this Hello (same pid, rank and size): it
        holds that place (a tp-1 stage's Hello still names its launch stage). None: a new
        process (e.g. restarted with its launch flags) is placed as any new worker."""
        place = self.state.workers.get(worker_id)
        if place is None or (place.pid, place.tp_rank, place.tp_size) != (pid, tp_rank,
                                                                           tp_size):
            return None
        return place


def placed(co: Any, msg: Any) -> Placement | None:
    """A Hello's recorded placement (membership.on_hello), when the layout came from a state.
    A whole-model WAA worker's Hello names its current role itself (the role it built)."""
    resumed: Resumed | None = getattr(co, "resumed", None)
    if resumed is None:
        return None
    place = resumed.placement(msg.worker_id, msg.pid, msg.tp_rank, msg.tp_size)
    return place if place is not None and place.role == msg.role else None


def hello_capacity(msg: Any, place: Placement | None) -> Any:
    """The worker's capacity: its recorded one (a role switch gave it the new role's), else
    what its Hello says (its launch capacity; checked by the caller)."""
    if place is not None and place.capacity is not None:
        return place.capacity
    return msg.capacity.get("max_seqs", 256) if isinstance(msg.capacity, dict) else None


def resume(cfg: CoordinatorConfig, model: Any, log: Any) -> tuple[CoordinatorConfig,
                                                                  Resumed | None]:
    """At start: the launch config, or the committed layout's when its state is valid."""
    path = state_path(cfg)
    if path is None or not path.exists():
        return cfg, None
    try:
        state = read(path)
        why = mismatch(state, cfg, model)
        new_cfg = cfg if why else apply(cfg, state)
    except (OSError, ValueError) as exc:
        why = str(exc)
    if why:
        log.warning("layout_state_ignored", path=str(path), why=why,
                    hint="serving the --plan's launch layout; workers placed otherwise stop")
        return cfg, None
    log.info("layout_state_resumed", path=str(path), epoch=state.epoch, stages=state.stages,
             streams=state.streams, workers={k: dataclasses.asdict(v)
                                             for k, v in state.workers.items()},
             written_at=state.written_at)
    return new_cfg, Resumed(path, state)


def restore(co: Any) -> None:
    """After the coordinator is built: the adapter serves the state's plan (its knobs, its
    workload as the detector's reference, the epoch count) and stats compare with it."""
    from coordinator.adapt_knobs import apply_knobs
    from coordinator.drift import DriftDetector, Reference
    from coordinator.planner.plan import Plan
    from coordinator.planner.workload import parse_workload

    resumed: Resumed | None = getattr(co, "resumed", None)
    if resumed is None:
        return
    plan = Plan.from_dict(resumed.state.plan)
    apply_knobs(co, plan, durable=False)  # it is the state's plan already
    layout = getattr(getattr(co, "pipeline", None), "layout", None)
    if resumed.state.tp and hasattr(layout, "tp"):  # a staged WAA layout's TP stage sizes
        co.pipeline.layout = dataclasses.replace(layout, tp=tuple(resumed.state.tp))
    adapter = getattr(co, "adapter", None)
    if adapter is not None:
        adapter.plan, adapter.relayouts = plan, resumed.state.epoch
        adapter.detector = DriftDetector(
            Reference.from_workload(parse_workload(plan.workload)), adapter.cfg.drift)
    if getattr(co, "metrics", None) is not None:
        co.metrics.set_plan(plan.to_dict())


def capture(co: Any, plan: Any, epoch: int, streams: int) -> LayoutState:
    """The served layout now (just after a switch committed): the stage workers' places, or
    (whole-model WAA) each worker's role and capacity."""
    from coordinator.relayout import layout_stages

    members, pipeline = co.members, getattr(co, "pipeline", None)
    local = set(getattr(members.exits, "_fds", {}))  # noqa: SLF001 - local pids watched
    pids = getattr(members, "_pids", {})  # noqa: SLF001
    roles = ("pipeline",) if pipeline is not None else ("encoder", "decoder")
    workers = {w.worker_id: Placement(w.stage, w.tp_rank, w.tp_size, w.tp_group,
                                      pids.get(w.worker_id), w.worker_id in local,
                                      w.role, None if pipeline is not None else w.capacity)
               for w in members.registry if w.role in roles}
    layout = getattr(pipeline, "layout", None)
    return LayoutState(policy=co.cfg.policy, plan=plan.to_dict(), epoch=epoch,
                       stages=layout_stages(layout) if layout is not None else None,
                       streams=streams, workers=workers, model_sha=model_sha(co.model),
                       tp=list(getattr(layout, "tp", ()) or ()),
                       plan_sha=plan_sha(co.cfg.plan), host=socket.gethostname(),
                       written_at=round(time.time(), 3))


def commit(co: Any, plan: Any, epoch: int, streams: int) -> None:
    """Write the state after a switch (unless it holds this already); a failure is logged
    (serving goes on regardless, but a restart would then serve the launch plan)."""
    path = state_path(co.cfg)
    if path is None:
        return
    try:
        state = capture(co, plan, epoch, streams)
        resumed: Resumed | None = getattr(co, "resumed", None)
        if resumed is not None and resumed.path == path and state.same_as(resumed.state):
            return
        write(path, state)
    except (OSError, ValueError) as exc:
        co.log.error("layout_state_write_failed", path=str(path), error=str(exc))
        return
    co.resumed = Resumed(path, state)  # a worker re-registering later is placed by it too
    co.log.info("layout_state_saved", path=str(path), epoch=epoch, stages=state.stages,
                streams=streams, workers={k: p.role if p.role != "pipeline" else p.stage
                                          for k, p in sorted(state.workers.items())})


def save(co: Any, plan: Any) -> None:
    """The plan now served (a role switch's, a knob-only switch's; apply_knobs): durable with
    the layout as it is, so a restart serves it again rather than the launch plan."""
    members, cfg = getattr(co, "members", None), getattr(co, "cfg", None)
    switching = getattr(getattr(co, "pipeline", None), "switching", False)
    if members is None or not getattr(cfg, "adapt", False) or state_path(cfg) is None or \
            switching or not len(members.registry):
        return  # not adapting; a re-layout commits its own state at its end; no worker yet
    adapter, resumed = getattr(co, "adapter", None), getattr(co, "resumed", None)
    epoch = adapter.relayouts if adapter is not None else resumed.state.epoch if resumed else 0
    commit(co, plan, epoch, served_streams(co))


def served_streams(co: Any) -> int:
    """Pipeline streams, or staged WAA's B_m (its micro-batches); whole-model WAA: 1."""
    pipeline = getattr(co, "pipeline", None)
    if pipeline is None:
        return 1
    micro = getattr(pipeline, "micro", None)
    return max(1, len(micro if micro is not None else pipeline.streams))


def refresh(co: Any) -> None:
    """A worker joined while a committed layout serves (a replacement: another pid): write
    the state again, so a later restart does not take the old pid's absence for stale."""
    resumed: Resumed | None = getattr(co, "resumed", None)
    adapter = getattr(co, "adapter", None)
    if resumed is None or getattr(co.pipeline, "switching", False):
        return
    from coordinator.planner.plan import Plan

    plan = adapter.plan if adapter is not None else Plan.from_dict(resumed.state.plan)
    commit(co, plan, resumed.state.epoch, resumed.state.streams)


def clear(co: Any) -> None:
    """A clean stop shut every worker down: the state describes no live process any more."""
    path = state_path(co.cfg)
    if path is not None and path.exists():
        path.unlink(missing_ok=True)
        co.log.info("layout_state_cleared", path=str(path))
