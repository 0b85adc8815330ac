"""The layout state file itself: its schema, validation, atomic write and read.

coordinator/layout_state.py decides when a state is written and how a restarted coordinator
uses it; this module holds what the file is. One state describes the plan being served and
where every worker is, whatever switch produced it:

    pipeline / staged WAA   stages (layer ranges), streams or B_m, per-stage tp sizes, and each
                            stage worker's stage, TP rank/size/group (role "pipeline")
    whole-model WAA         no stages; each worker's current role (encoder or decoder, changed
                            by a live role switch, coordinator/adapt_roles.py) and capacity
    knob-only switch        the same layout as before with the new plan's knobs (B_E, N_D, B_m,
                            thresholds): the plan is what a restart serves again
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.config import CoordinatorConfig

VERSION = 1  # role/capacity and epoch 0 (a knob-only switch) only add optional content
STATE_ENV = "EXEGPT_LAYOUT_STATE"
ROLES = ("pipeline", "encoder", "decoder")


@dataclass(frozen=True)
class Placement:
    """Where one worker is now. A stage worker: ``stage`` (None: a spare holding no layers);
    a whole-model WAA worker: its ``role`` and the role's ``capacity`` (a switched worker's
    Hello still names its launch capacity)."""

    stage: int | None
    tp_rank: int = 0
    tp_size: int = 1
    tp_group: str | None = None  # the coordinator-formed TP group (WorkerInfo.tp_group)
    pid: int | None = None
    local: bool = False  # a process of the coordinator's host (its pid can be checked)
    role: str = "pipeline"
    capacity: int | None = None

    def __post_init__(self) -> None:
        if self.stage is not None and self.stage < 0:
            raise ValueError(f"a stage is >= 0, got {self.stage}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"need 0 <= tp_rank < tp_size, got {self.tp_rank}/{self.tp_size}")
        if self.role not in ROLES:
            raise ValueError(f"a worker's role is one of {ROLES}, got {self.role!r}")
        if self.role != "pipeline" and self.stage is not None:
            raise ValueError(f"a whole-model {self.role} holds no stage")
        if self.capacity is not None and (type(self.capacity) is not int or self.capacity < 1):
            raise ValueError(f"a capacity is an int >= 1, got {self.capacity!r}")


@dataclass(frozen=True)
class LayoutState:
    """The served plan and layout: what a restarted coordinator needs to serve it again."""

    policy: str
    plan: dict[str, Any]  # the served Plan (Plan.to_dict)
    epoch: int  # re-layouts and role switches so far (0: only knobs switched): the count goes on
    stages: Any  # pipeline [[lo, hi], ...]; staged WAA {"encoder", "decoder"}; whole-model None
    streams: int  # pipeline streams, or B_m (whole-model WAA: 1, unused)
    workers: dict[str, Placement]
    model_sha: str  # the served model's shape
    plan_sha: str  # the --plan file this coordinator was started with
    tp: list[int] = dataclasses.field(default_factory=list)  # per stage; [] all tp-1 / Hellos
    host: str = ""
    written_at: float = 0.0

    def __post_init__(self) -> None:
        if self.epoch < 0 or self.streams < 1 or not self.workers:
            raise ValueError("a layout state needs epoch >= 0, streams >= 1 and workers")
        if self.whole_model:
            if self.policy != "waa" or self.stages:
                raise ValueError("whole-model workers (encoder/decoder roles) are a WAA "
                                 "layout without stages")
            if min(self.counts) < 1:
                raise ValueError(f"a WAA mesh needs >= 1 encoder and decoder, got {self.counts}")
        elif any(p.role != "pipeline" for p in self.workers.values()):
            raise ValueError("a layout state mixes stage workers and whole-model workers")
        elif self.policy == "waa":
            if not isinstance(self.stages, dict) or not self.stages.get("encoder") \
                    or not self.stages.get("decoder"):
                raise ValueError("a staged WAA state needs encoder and decoder stages")
        elif not isinstance(self.stages, list) or not self.stages:
            raise ValueError("a pipeline state needs its stages' layer ranges")

    @property
    def whole_model(self) -> bool:
        """A whole-model WAA mesh: every worker an encoder or a decoder (no stages)."""
        return all(p.role != "pipeline" for p in self.workers.values())

    @property
    def counts(self) -> tuple[int, int]:
        """Whole-model WAA: (encoders, decoders)."""
        roles = [p.role for p in self.workers.values()]
        return roles.count("encoder"), roles.count("decoder")

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

    def same_as(self, other: LayoutState | None) -> bool:
        """The same content (only the time written may differ): no need to write again."""
        return other is not None and dataclasses.replace(other, written_at=0.0) == \
            dataclasses.replace(self, written_at=0.0)


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


def apply(cfg: CoordinatorConfig, state: LayoutState) -> CoordinatorConfig:
    """The launch config with the state's layout (stages, ranges, streams, roles, knobs)."""
    plan = state.plan
    knobs: dict[str, Any] = {"max_encode_batch": int(plan["B_E"])}
    if state.whole_model:  # the roles as switched: serving waits for this split
        enc, dec = state.counts
        return dataclasses.replace(cfg, **knobs, num_encoders=enc, num_decoders=dec)
    knobs["streams"] = state.streams
    if state.policy == "waa":
        enc, dec = state.stages["encoder"], state.stages["decoder"]
        return dataclasses.replace(cfg, **knobs, waa_encoder_layers=_ranges(enc),
                                   waa_decoder_layers=_ranges(dec))
    enc = [g["encoder_layer_range"] for g in plan.get("worker_groups") or ()
           if g.get("encoder_layer_range")]  # T5: each stage's encoder-stack range too
    if enc and len(enc) == len(state.stages):
        knobs["stage_encoder_layers"] = _ranges(enc)
    return dataclasses.replace(cfg, **knobs, n_d=int(plan.get("N_D") or 1),
                               pipeline_stages=len(state.stages),
                               stage_layers=_ranges(state.stages))


def _ranges(ranges: list[list[int]]) -> str:
    return ",".join(f"{lo}:{hi}" for lo, hi in ranges)
