"""The layout a live re-layout adopted, kept on disk so a restarted coordinator expects it.

A live re-layout (coordinator.relayout, relayout_tp; adapt_relayout.finish) moves the stage
workers to other layer ranges, stages or TP groups. The workers keep that placement across a
coordinator restart (docs/mesh.md, "Coordinator restart") and a rejoining worker stops when the
new instance assigns anything else. A coordinator started again with its launch flags and the
original ``--plan`` would assign the launch layout, so every moved worker would stop. Hence::

    switch committed   commit(): the adopted plan, the stages, streams, epoch and every stage
                       worker's placement (stage, TP rank/size/group, pid) are written
                       atomically (temp file, fsync, rename) to the state file
    coordinator start  resume(): a state file for this model, this --plan and live workers
                       replaces the launch layout (log ``layout_state_resumed``); anything else
                       is ignored with ``layout_state_ignored`` and the reason: the workers
                       that no longer match stop and their supervisor restarts them in the
                       launch layout, which recovers service (a refusal to start would not)
    clean stop         clear(): the coordinator shut its workers down, nothing holds the layout

Where: ``EXEGPT_LAYOUT_STATE`` (a path, or ``off``), else ``<plan stem>.layout.json`` beside
``--plan``; only an adapting coordinator (``--adapt``) re-lays out, so only it reads or writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.config import CoordinatorConfig

VERSION = 1
STATE_ENV = "EXEGPT_LAYOUT_STATE"


@dataclass(frozen=True)
class Placement:
    """Where one stage worker is now; ``stage`` None: a spare holding no layers."""

    stage: int | None
    tp_rank: int = 0
    tp_size: int = 1
    tp_group: str | None = None  # the coordinator-formed TP group (WorkerInfo.tp_group)
    pid: int | None = None
    local: bool = False  # a process of the coordinator's host (its pid can be checked)

    def __post_init__(self) -> None:
        if self.stage is not None and self.stage < 0:
            raise ValueError(f"a stage is >= 0, got {self.stage}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"need 0 <= tp_rank < tp_size, got {self.tp_rank}/{self.tp_size}")


@dataclass(frozen=True)
class LayoutState:
    """One committed layout: what a restarted coordinator needs to assign it again."""

    policy: str
    plan: dict[str, Any]  # the adopted Plan (Plan.to_dict)
    epoch: int  # the re-layout's epoch: a later one continues the count
    stages: Any  # pipeline [[lo, hi], ...]; staged WAA {"encoder": [...], "decoder": [...]}
    streams: int  # pipeline streams, or B_m
    workers: dict[str, Placement]
    model_sha: str  # the served model's shape
    plan_sha: str  # the --plan file this coordinator was started with
    tp: list[int] = dataclasses.field(default_factory=list)  # per stage; [] all tp-1 / Hellos
    host: str = ""
    written_at: float = 0.0

    def __post_init__(self) -> None:
        if self.epoch < 1 or self.streams < 1 or not self.workers:
            raise ValueError("a layout state needs epoch >= 1, streams >= 1 and workers")
        if self.policy == "waa":
            if not isinstance(self.stages, dict) or not self.stages.get("encoder") \
                    or not self.stages.get("decoder"):
                raise ValueError("a staged WAA state needs encoder and decoder stages")
        elif not isinstance(self.stages, list) or not self.stages:
            raise ValueError("a pipeline state needs its stages' layer ranges")

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        return json.dumps({"version": VERSION, **data}, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LayoutState:
        """The state, or ValueError saying what is wrong with the text."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.pop("version", None) != VERSION:
                raise ValueError(f"not a version {VERSION} layout state")
            data["workers"] = {str(k): Placement(**v) for k, v in data["workers"].items()}
            return cls(**data)
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a layout state: {exc}") from exc


def state_path(cfg: CoordinatorConfig) -> Path | None:
    """The state file of this coordinator, or None (not adapting, no plan, or off)."""
    env = os.environ.get(STATE_ENV, "")
    if env.lower() in ("off", "0", "none") or not cfg.adapt or not cfg.plan:
        return None
    return Path(env) if env else Path(cfg.plan).with_name(f"{Path(cfg.plan).stem}.layout.json")


def model_sha(model: Any) -> str:
    return hashlib.sha256(json.dumps(model.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def plan_sha(path: str) -> str:
    """The --plan file's content (a replaced plan makes an older state stale)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def write(path: Path, state: LayoutState) -> None:
    """Atomically: a reader sees the old file or the new one, never a part (same directory
    temp file, fsync, rename, fsync of the directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(state.to_json())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read(path: Path) -> LayoutState:
    """The state in ``path``; OSError (unreadable) or ValueError (corrupt)."""
    return LayoutState.from_json(path.read_text(encoding="utf-8"))


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


def apply(cfg: CoordinatorConfig, state: LayoutState) -> CoordinatorConfig:
    """The launch config with the state's layout (stages, ranges, streams, knobs)."""
    plan = state.plan
    knobs = {"max_encode_batch": int(plan["B_E"]), "streams": state.streams}
    if state.policy == "waa":
        enc, dec = state.stages["encoder"], state.stages["decoder"]
        return dataclasses.replace(cfg, **knobs, waa_encoder_layers=_ranges(enc),
                                   waa_decoder_layers=_ranges(dec))
    return dataclasses.replace(cfg, **knobs, n_d=int(plan.get("N_D") or 1),
                               pipeline_stages=len(state.stages),
                               stage_layers=_ranges(state.stages))


def _ranges(ranges: list[list[int]]) -> str:
    return ",".join(f"{lo}:{hi}" for lo, hi in ranges)


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
    """A Hello's recorded placement (membership.on_hello), when the layout came from a state."""
    resumed: Resumed | None = getattr(co, "resumed", None)
    if resumed is None or msg.role != "pipeline":
        return None
    return resumed.placement(msg.worker_id, msg.pid, msg.tp_rank, msg.tp_size)


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
    apply_knobs(co, plan)
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
    """The served layout now (just after a switch committed)."""
    from coordinator.relayout import layout_stages

    members = co.members
    local = set(getattr(members.exits, "_fds", {}))  # noqa: SLF001 - local pids watched
    pids = getattr(members, "_pids", {})  # noqa: SLF001
    workers = {w.worker_id: Placement(w.stage, w.tp_rank, w.tp_size, w.tp_group,
                                      pids.get(w.worker_id), w.worker_id in local)
               for w in members.registry if w.role == "pipeline"}
    return LayoutState(policy=co.cfg.policy, plan=plan.to_dict(), epoch=epoch,
                       stages=layout_stages(co.pipeline.layout), streams=streams,
                       workers=workers, model_sha=model_sha(co.model),
                       tp=list(getattr(co.pipeline.layout, "tp", ()) or ()),
                       plan_sha=plan_sha(co.cfg.plan), host=socket.gethostname(),
                       written_at=round(time.time(), 3))


def commit(co: Any, plan: Any, epoch: int, streams: int) -> None:
    """Write the state after a switch; a failure is logged (serving goes on regardless, but
    a coordinator restart would then expect the launch layout)."""
    path = state_path(co.cfg)
    if path is None or getattr(co, "pipeline", None) is None:
        return
    try:
        state = capture(co, plan, epoch, streams)
        write(path, state)
    except (OSError, ValueError) as exc:
        co.log.error("layout_state_write_failed", path=str(path), error=str(exc))
        return
    co.resumed = Resumed(path, state)  # a worker re-registering later is placed by it too
    co.log.info("layout_state_saved", path=str(path), epoch=epoch, stages=state.stages,
                streams=streams, workers=sorted(state.workers))


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
