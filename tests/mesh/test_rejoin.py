"""A worker's link against a fake coordinator ROUTER: what makes it re-register (another
coordinator instance, being declared lost, silence), what it drops, and when it gives up;
plus the rate-limited logger that keeps hostile peers from filling the disk."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from common import protocol as P
from common.logbudget import LogLimiter
from common.workerconfig import WorkerConfig
from common.workerlink import Rejoin, Stop, WorkerLink


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def _add(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))

    info = warning = error = debug = exception = _add

    def names(self) -> list[str]:
        return [name for name, _ in self.lines]


class FakeCoordinator:
    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # as the real one
        self.sock.bind(endpoint)

    def recv(self, want: type, timeout_s: float = 5.0) -> tuple[bytes, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.sock.poll(100):
                route, *frames = self.sock.recv_multipart()
                msg = P.decode(frames)
                if isinstance(msg, want):
                    return route, msg
        raise AssertionError(f"no {want.__name__} within {timeout_s} s")

    def send(self, route: bytes, msg: P.Message) -> None:
        self.sock.send_multipart([route, *P.encode(msg)])


def assign(instance: str, **kw: Any) -> P.Assign:
    return P.Assign(worker_id="dec0", role="decoder", heartbeat_interval_s=0.1,
                    config={"model": {"x": 1}, "instance": instance}, **kw)


@pytest.fixture
def linked(tmp_path: Path) -> Iterator[tuple[FakeCoordinator, WorkerLink, bytes, Log]]:
    endpoint = f"ipc://{tmp_path}/co"
    coordinator = FakeCoordinator(endpoint)
    cfg = WorkerConfig(role="decoder", worker_id="dec0", coordinator=endpoint,
                       kv_bind=f"ipc://{tmp_path}/kv", heartbeat_interval_s=0.1,
                       heartbeat_timeout_s=1.0, startup_timeout_s=3.0)
    log = Log()
    link = WorkerLink(cfg, log)
    starter = threading.Thread(target=link.start, daemon=True)
    starter.start()
    route, _ = coordinator.recv(P.Hello)
    coordinator.send(route, assign("A"))
    starter.join(5)
    link.ready({"pid": 1})
    coordinator.recv(P.Ready)
    yield coordinator, link, route, log
    link.close()
    coordinator.sock.close(linger=0)


def _inbox(link: WorkerLink, timeout_s: float = 3.0) -> Any:
    return link.inbox.get(timeout=timeout_s)


@pytest.mark.parametrize("trigger", ["new_instance", "declared_lost"])
def test_the_link_drops_its_work_and_registers_again(
        linked: tuple[FakeCoordinator, WorkerLink, bytes, Log], trigger: str) -> None:
    coordinator, link, route, log = linked
    coordinator.send(route, P.Cancel(req_id="old"))  # old work, still queued for the loop
    time.sleep(0.2)
    if trigger == "new_instance":
        coordinator.send(route, P.Heartbeat(worker_id="coordinator", seq=1, t_sent=0.0,
                                            load={"instance": "B"}))
    else:
        coordinator.send(route, P.Error(code="unavailable", message="declared lost"))
    route, _ = coordinator.recv(P.Hello)
    coordinator.send(route, assign("B"))
    _, ready = coordinator.recv(P.Ready)
    assert ready.info == {"pid": 1}  # the first Ready's info, said again
    items = []
    while not link.inbox.empty():
        items.append(_inbox(link))
    assert [type(i) for i in items] == [Rejoin]  # the queued Cancel was dropped
    assert "rejoined" in log.names()


def test_silence_rejoins_then_gives_up_with_a_stop(
        linked: tuple[FakeCoordinator, WorkerLink, bytes, Log]) -> None:
    _, link, _, log = linked
    assert isinstance(_inbox(link, 3.0), Rejoin)  # no coordinator message for 1 s
    stop = _inbox(link, 6.0)  # no Assign within startup_timeout_s (3 s)
    assert isinstance(stop, Stop) and stop.error and "coordinator gone" in stop.reason
    assert "coordinator_lost" in log.names()


def test_a_different_placement_stops_the_worker(
        linked: tuple[FakeCoordinator, WorkerLink, bytes, Log]) -> None:
    coordinator, link, route, _ = linked
    coordinator.send(route, P.Error(code="unavailable", message="declared lost"))
    route, _ = coordinator.recv(P.Hello)
    coordinator.send(route, assign("B", tp_size=2))
    assert isinstance(_inbox(link), Rejoin)
    stop = _inbox(link)
    assert isinstance(stop, Stop) and "tp_size" in stop.reason


def test_the_log_limiter_counts_a_flood_and_summarises_it() -> None:
    log = Log()
    limiter = LogLimiter(log, burst=3, window_s=0.2)
    for i in range(1000):
        limiter.warning("bad_kv_message", n=i)
    assert log.names() == ["bad_kv_message"] * 3
    time.sleep(0.25)
    limiter.flush()
    assert log.lines[-1] == ("log_suppressed", {"suppressed_event": "bad_kv_message",
                                                "count": 997, "window_s": 0.2,
                                                "last": {"n": 999}})
    limiter.flush()  # reported once
    assert len(log.lines) == 4 and limiter.suppressed == 997
    with pytest.raises(ValueError):
        LogLimiter(log, burst=0)
