"""Workers known to the coordinator: who they are, whether they are alive, how loaded.

Worker lifecycle (one entry per worker process, i.e. per TP rank)::

    HELLO received --Assign sent--> ASSIGNED --READY received--> READY
          any state --heartbeat deadline passed / Shutdown / exit--> LOST (entry removed)

Only rank 0 of a TP group carries data (it receives EncodeBatch / KVHandoff on the group's
behalf); the other ranks register and heartbeat so that a dead rank takes its group down. A
group is the launch's (ids ``<group>.r<rank>``) until a live TP re-group
(coordinator.relayout_tp) names it in ``WorkerInfo.tp_group``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field

ROLES = ("encoder", "decoder")  # a WAA mesh needs both
PIPELINE_ROLE = "pipeline"  # stage workers of RRA / static / continuous plans


class WorkerState(enum.Enum):
    ASSIGNED = "assigned"
    READY = "ready"


@dataclass
class WorkerInfo:
    """What a worker said in HELLO plus the coordinator's live accounting for it."""

    worker_id: str
    role: str
    routing_id: bytes
    tp_rank: int
    tp_size: int
    device: str
    capacity: int  # decoder: max running sequences; encoder: max requests per encode batch
    kv_endpoint: str | None
    last_seen: float
    state: WorkerState = WorkerState.ASSIGNED
    num_active: int = 0  # decoder: sequences assigned and not finished; encoder: requests
    outstanding_batches: int = 0  # encoder: batches sent, not yet reported encoded
    batches_sent: int = 0
    load: dict[str, object] = field(default_factory=dict)  # its latest Heartbeat.load
    stage: int | None = None  # pipeline role: its stage (Hello.capacity["stage"])
    # the TP group the coordinator formed live (coordinator.relayout_tp); None: the launch's
    # group, named by the id stem
    tp_group: str | None = None

    @property
    def free_slots(self) -> int:
        return max(0, self.capacity - self.num_active)

    @property
    def leads_data(self) -> bool:
        return self.tp_rank == 0


class Registry:
    """Workers by id, with the routing ids the worker ROUTER socket uses to reach them."""

    def __init__(self) -> None:
        self._by_id: dict[str, WorkerInfo] = {}
        self._by_route: dict[bytes, str] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[WorkerInfo]:
        return iter(list(self._by_id.values()))

    def add(self, info: WorkerInfo) -> None:
        """Register a HELLO; a known id re-registering (restart) replaces the old entry."""
        if info.role not in (*ROLES, PIPELINE_ROLE):
            raise ValueError(f"unknown worker role {info.role!r}; expected one of "
                             f"{(*ROLES, PIPELINE_ROLE)}")
        old = self._by_id.get(info.worker_id)
        if old is not None:
            self._by_route.pop(old.routing_id, None)
        self._by_id[info.worker_id] = info
        self._by_route[info.routing_id] = info.worker_id

    def get(self, worker_id: str) -> WorkerInfo | None:
        return self._by_id.get(worker_id)

    def by_route(self, routing_id: bytes) -> WorkerInfo | None:
        worker_id = self._by_route.get(routing_id)
        return None if worker_id is None else self._by_id.get(worker_id)

    def remove(self, worker_id: str) -> WorkerInfo | None:
        info = self._by_id.pop(worker_id, None)
        if info is not None:
            self._by_route.pop(info.routing_id, None)
        return info

    def ready(self, role: str) -> list[WorkerInfo]:
        """Data-carrying workers of ``role`` that finished the handshake."""
        return [w for w in self._by_id.values()
                if w.role == role and w.state is WorkerState.READY and w.leads_data]

    def count_ready(self, role: str) -> int:
        return sum(1 for w in self._by_id.values()
                   if w.role == role and w.state is WorkerState.READY)

    def silent(self, now: float, timeout_s: float) -> list[WorkerInfo]:
        return [w for w in self._by_id.values() if now - w.last_seen > timeout_s]

    def group_of(self, info: WorkerInfo) -> list[WorkerInfo]:
        """The ranks of ``info``'s TP group: the group a live re-group assigned
        (``tp_group``), else the launch's (same id stem ``<group>.r<rank>``)."""
        key = group_key(info)
        return [w for w in self._by_id.values() if group_key(w) == key]


def group_key(info: WorkerInfo) -> str:
    """A worker's TP group: the coordinator-assigned id, else the launch's id stem."""
    return f"live:{info.tp_group}" if info.tp_group is not None else group_stem(info.worker_id)


def group_stem(worker_id: str) -> str:
    """``dec0.r1`` -> ``dec0``: TP ranks of one group share the part before ``.r``."""
    stem, sep, rank = worker_id.rpartition(".r")
    return stem if sep and rank.isdigit() else worker_id
