"""Control messages (type bytes 0x0_): the worker handshake, heartbeats and shutdown.
Import them from common.protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from common.protocol_codec import Json, Message, register
from common.protocol_values import ROLES, _check_id, _check_range


@register
@dataclass(frozen=True)
class Hello(Message):
    """Worker -> coordinator, first message: who I am and what I can hold."""

    TYPE: ClassVar[int] = 0x01
    worker_id: str
    role: str
    tp_rank: int = 0
    tp_size: int = 1
    device: str = "cpu"
    pid: int = 0
    host: str = ""
    kv_endpoint: str | None = None
    capacity: Json = field(default_factory=dict)

    def check(self) -> None:
        _check_id("worker_id", self.worker_id)
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"need 0 <= tp_rank < tp_size, got {self.tp_rank}/{self.tp_size}")


@register
@dataclass(frozen=True)
class Assign(Message):
    """Coordinator -> worker: its role, layers and peers (config holds plan/backend data)."""

    TYPE: ClassVar[int] = 0x02
    worker_id: str
    role: str
    group: int = 0
    tp_rank: int = 0
    tp_size: int = 1
    layer_range: tuple[int, ...] | None = None
    encoder_layer_range: tuple[int, ...] | None = None
    peers: dict[str, str] = field(default_factory=dict)
    heartbeat_interval_s: float = 1.0
    config: Json = field(default_factory=dict)

    def check(self) -> None:
        _check_id("worker_id", self.worker_id)
        if self.role not in ROLES[:3]:
            raise ValueError(f"assigned role must be one of {ROLES[:3]}, got {self.role!r}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"need 0 <= tp_rank < tp_size, got {self.tp_rank}/{self.tp_size}")
        _check_range("layer_range", self.layer_range)
        _check_range("encoder_layer_range", self.encoder_layer_range)
        if not self.heartbeat_interval_s > 0:
            raise ValueError("heartbeat_interval_s must be > 0")


@register
@dataclass(frozen=True)
class Ready(Message):
    """Worker -> coordinator: assignment applied (weights loaded, KV socket bound)."""

    TYPE: ClassVar[int] = 0x03
    worker_id: str
    kv_endpoint: str | None = None
    info: Json = field(default_factory=dict)

    def check(self) -> None:
        _check_id("worker_id", self.worker_id)


@register
@dataclass(frozen=True)
class Heartbeat(Message):
    """Both directions: liveness plus the sender's load (queue lengths, KV use ...).

    Encoders report completed encode batches as `load["batches_done"]` (a running count).
    """

    TYPE: ClassVar[int] = 0x04
    worker_id: str
    seq: int
    t_sent: float
    load: Json = field(default_factory=dict)


@register
@dataclass(frozen=True)
class Shutdown(Message):
    """Coordinator -> worker: stop; with drain, finish in-flight work first."""

    TYPE: ClassVar[int] = 0x05
    reason: str = ""
    drain: bool = True
