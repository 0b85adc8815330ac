"""A serving WAA coordinator in process (fake sockets, no workers): what the unit tests of
the re-run, replay and role-switch paths drive."""

from __future__ import annotations

from typing import Any

from common import protocol as P
from coordinator.config import CoordinatorConfig
from coordinator.membership import Membership
from coordinator.relay import Relay
from coordinator.server import Coordinator
from tests.runner.test_pipeline_driver import Log, Sock


def waa_coordinator(encoders: dict[str, str | None], decoders: list[str],
                    **config: Any) -> tuple[Coordinator, Sock, Sock]:
    """(coordinator, worker socket, client socket) with ``encoders`` (id -> KV endpoint or
    None) and ``decoders`` registered and Ready; ``config`` adds CoordinatorConfig fields."""
    cfg = CoordinatorConfig("ipc:///tmp/c", "ipc:///tmp/w", policy="waa", max_encode_batch=4,
                            num_encoders=len(encoders), num_decoders=len(decoders), **config)
    co = Coordinator(cfg, Log())
    workers, clients = Sock(), Sock()
    co.client_endpoint = co.worker_endpoint = "ipc:///tmp/x"
    co.relay = Relay(clients, co.log, co.counters)  # type: ignore[arg-type]
    co.members = Membership(co, workers)  # type: ignore[arg-type]
    hellos = [(w, "encoder", kv) for w, kv in encoders.items()]
    hellos += [(w, "decoder", f"ipc:///tmp/kv-{w}") for w in decoders]
    for worker, role, kv in hellos:
        co.members.on_hello(worker.encode(), P.Hello(worker_id=worker, role=role,
                                                     kv_endpoint=kv, capacity={"max_seqs": 8}))
    for worker, _, kv in hellos:
        co.members._dispatch(co.members.registry.get(worker),
                             P.Ready(worker_id=worker, kv_endpoint=kv))
    workers.sent.clear()
    return co, workers, clients
