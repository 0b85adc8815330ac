"""Fast worker loss (issue 7): the goodbye a failing worker sends, and the coordinator's
reaction to it and to a local worker process's exit, without waiting for the heartbeat
deadline. End to end: test_faults_injected.py (null model) and test_tp_rank_kill_real.py."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from common import protocol as P
from common.workerconfig import WorkerConfig
from common.workerlink import WorkerLink
from common.workermain import run_worker
from coordinator.exitwatch import ExitWatch, is_local_worker
from coordinator.membership import Membership
from tests.mesh.test_rejoin import FakeCoordinator, Log

ENC_ASSIGN = P.Assign(worker_id="enc0", role="encoder", heartbeat_interval_s=0.1,
                      config={"model": {"x": 1}, "instance": "A"})


class RecordingSocket:
    """Stands in for the coordinator's ROUTER: keeps what Membership sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, P.Message]] = []

    def send_multipart(self, frames: list[Any], *args: Any, **kw: Any) -> None:
        self.sent.append((frames[0], P.decode([bytes(f) for f in frames[1:]])))


def membership() -> tuple[Membership, list[tuple[str, str]]]:
    """A Membership over a stub coordinator that records every re-run/fail call."""
    reruns: list[tuple[str, str]] = []
    cfg = SimpleNamespace(policy="waa", ready_fd=None, num_encoders=1, num_decoders=1,
                          heartbeat_interval_s=0.1, heartbeat_timeout_s=5.0, adapt=False)
    table = SimpleNamespace(held_by=lambda worker_id: [f"req-of-{worker_id}"],
                            get_wire=dict().get)
    co = SimpleNamespace(cfg=cfg, log=Log(), table=table, pipeline=None, adapter=None,
                         instance="A", model=SimpleNamespace(to_dict=lambda: {"x": 1}),
                         rerun_or_fail=lambda request, lost, role, why: reruns.append(
                             (request, why)))
    return Membership(co, RecordingSocket()), reruns  # type: ignore[arg-type]


def join(members: Membership, worker_id: str, rank: int, size: int) -> bytes:
    route = worker_id.encode()
    hello = P.Hello(worker_id=worker_id, role="decoder", tp_rank=rank, tp_size=size,
                    kv_endpoint=f"ipc:///tmp/{worker_id}", capacity={"max_seqs": 4})
    members.on_frames([SimpleNamespace(bytes=route), *P.encode(hello)])
    members.on_frames([SimpleNamespace(bytes=route), *P.encode(P.Ready(worker_id=worker_id))])
    return route


def test_a_goodbye_drops_the_whole_tp_group_at_once() -> None:
    members, reruns = membership()
    r0 = join(members, "dec0.r0", 0, 2)
    join(members, "dec0.r1", 1, 2)
    join(members, "dec1", 0, 1)
    members.on_frames([SimpleNamespace(bytes=r0), *P.encode(P.Error(
        code="worker_lost", message="dec0.r0: RuntimeError: Connection closed by peer"))])
    assert sorted(w.worker_id for w in members.registry) == ["dec1"]
    assert sorted(r for r, _ in reruns) == ["req-of-dec0.r0", "req-of-dec0.r1"]
    assert all("Connection closed by peer" in why for _, why in reruns)


def test_a_request_error_is_not_a_goodbye() -> None:
    members, reruns = membership()
    r0 = join(members, "dec0", 0, 1)
    members.on_frames([SimpleNamespace(bytes=r0), *P.encode(P.Error(
        code="worker_lost", message="a peer of this request", req_id="x"))])
    assert [w.worker_id for w in members.registry] == ["dec0"] and not reruns


def test_goodbye_reaches_the_coordinator_before_the_link_closes(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/co"
    coordinator = FakeCoordinator(endpoint)
    cfg = WorkerConfig(role="encoder", worker_id="enc0", coordinator=endpoint,
                       heartbeat_interval_s=0.1, heartbeat_timeout_s=1.0, startup_timeout_s=3.0)
    link = WorkerLink(cfg, Log())
    starter = threading.Thread(target=link.start, daemon=True)
    starter.start()
    route, _ = coordinator.recv(P.Hello)
    coordinator.send(route, ENC_ASSIGN)
    starter.join(5)
    try:
        assert link.goodbye("collective failed")
    finally:
        link.close()
    _, msg = coordinator.recv(P.Error)
    assert (msg.code, msg.req_id, msg.message) == ("worker_lost", None,
                                                   "enc0: collective failed")
    assert not link.goodbye("after close")  # a closed link says nothing (and does not block)
    coordinator.sock.close(linger=0)


class Crashing:
    """A compute loop that fails the way a broken gloo collective does."""

    def load(self) -> dict[str, Any]:
        return {}

    def run(self) -> int:
        raise RuntimeError("[gloo] Connection closed by peer")


def test_a_crashing_loop_says_goodbye_and_exits_1(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import common.workermain

    log = Log()
    monkeypatch.setattr(common.workermain, "setup_worker_logs", lambda cfg: log)
    endpoint = f"ipc://{tmp_path}/co"
    coordinator = FakeCoordinator(endpoint)
    cfg = WorkerConfig(role="encoder", worker_id="enc0", coordinator=endpoint,
                       heartbeat_interval_s=0.1, heartbeat_timeout_s=1.0, startup_timeout_s=3.0)
    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(
        run_worker(cfg, lambda link, a, log: Crashing())), daemon=True)
    try:
        import signal  # run_worker installs handlers: only the main thread may

        monkeypatch.setattr(signal, "signal", lambda *a: None)
        runner.start()
        route, _ = coordinator.recv(P.Hello)
        coordinator.send(route, ENC_ASSIGN)
        _, msg = coordinator.recv(P.Error)
        runner.join(5)
        assert result == [1]
        assert msg.code == "worker_lost" and msg.req_id is None
        assert "Connection closed by peer" in msg.message
        assert "failed" in log.names()
    finally:
        coordinator.sock.close(linger=0)


def test_exit_watch_sees_a_local_worker_process_end() -> None:
    # a process whose command line names a worker module (as `python -m decoder_worker`)
    code = "import sys; print('up', flush=True); sys.stdin.read()"
    proc = subprocess.Popen([sys.executable, "-c", code, "decoder_worker"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.readline()  # exec'd: before that, /proc/PID/cmdline is still the parent's
    exited: list[tuple[str, int]] = []

    async def scenario() -> float:
        watch = ExitWatch(lambda worker_id, pid: exited.append((worker_id, pid)), Log())
        import socket

        assert watch.watch("dec0", proc.pid, socket.gethostname())
        assert not watch.watch("dec9", proc.pid, "another-host")  # remote: heartbeats only
        t0 = time.monotonic()
        assert proc.stdin is not None
        proc.kill()
        while not exited and time.monotonic() - t0 < 5:
            await asyncio.sleep(0.01)
        watch.close()
        return time.monotonic() - t0

    try:
        assert asyncio.run(scenario()) < 5
    finally:
        proc.kill()
        proc.wait(5)
    assert exited == [("dec0", proc.pid)]


def test_only_worker_processes_of_this_host_are_watched() -> None:
    import os
    import socket

    assert not is_local_worker(os.getpid(), socket.gethostname())  # ourselves
    assert not is_local_worker(1, "not-" + socket.gethostname())
    assert not is_local_worker(0, socket.gethostname())
