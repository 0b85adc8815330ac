"""The Plan: the chosen schedule as one JSON value, logged, saved and sent to the runner unchanged.

``worker_groups`` is what the runner launches: one group per pipeline stage, ``count`` workers
forming one TP group of ``tp_size`` (so count == tp_size), holding decoder layers
``layer_range`` [lo, hi) and, for T5, encoder layers ``encoder_layer_range``. Roles: "pipeline"
(RRA/static/continuous: the stage encodes and decodes), "encoder", "decoder" (WAA). Groups are
listed in pipeline order per role. ``microbatches`` is how many batches are in flight in the
decode pipeline (RRA/static/continuous: one per stage; WAA: B_m).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from coordinator.planner.candidate import POLICIES

ROLES = ("encoder", "decoder", "pipeline")
PLAN_VERSION = 1


@dataclass(frozen=True)
class WorkerGroup:
    role: str
    count: int
    tp_size: int
    layer_range: tuple[int, int]
    encoder_layer_range: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"worker group role must be one of {ROLES}, got {self.role!r}")
        if self.count < 1 or self.tp_size < 1 or self.count % self.tp_size:
            raise ValueError(f"worker group count must be a positive multiple of tp_size: {self}")
        object.__setattr__(self, "layer_range", tuple(self.layer_range))
        if self.encoder_layer_range is not None:
            object.__setattr__(self, "encoder_layer_range", tuple(self.encoder_layer_range))


@dataclass(frozen=True)
class Plan:
    policy: str
    model: dict[str, Any]
    workload: str
    latency_bound_s: float
    sla: str
    num_workers: int
    worker_groups: tuple[WorkerGroup, ...]
    B_E: int
    B_D: float
    N_D: int | None
    B_m: int | None
    microbatches: int
    adjust: dict[str, list[float]]
    predicted: dict[str, Any]
    search: dict[str, Any]
    profile_meta: dict[str, Any]
    version: int = PLAN_VERSION
    workload_info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"plan policy must be one of {POLICIES}, got {self.policy!r}")
        if self.sla not in ("a", "b"):
            raise ValueError(f"plan SLA must be 'a' or 'b', got {self.sla!r}")
        groups = tuple(g if isinstance(g, WorkerGroup) else WorkerGroup(**g)
                       for g in self.worker_groups)
        object.__setattr__(self, "worker_groups", groups)
        if sum(g.count for g in groups) != self.num_workers:
            raise ValueError(f"worker groups hold {sum(g.count for g in groups)} workers, "
                             f"plan says {self.num_workers}")
        if self.version != PLAN_VERSION:
            raise ValueError(f"plan version {self.version} is not {PLAN_VERSION}; re-plan")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["worker_groups"] = [
            {**asdict(g), "layer_range": list(g.layer_range),
             "encoder_layer_range": list(g.encoder_layer_range) if g.encoder_layer_range else None}
            for g in self.worker_groups]
        return out

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        data = dict(data)
        data["worker_groups"] = tuple(WorkerGroup(**g) for g in data["worker_groups"])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))

    def groups(self, role: str) -> list[WorkerGroup]:
        return [g for g in self.worker_groups if g.role == role]
