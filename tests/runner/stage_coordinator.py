"""A fake coordinator for stage-worker processes (tests and ad-hoc measurements): just the
handshake, heartbeats, StagePasses to stage 0 and the PassDones back, over a real ROUTER."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from common import protocol as P
from common.sockets import make_socket


def requests(work: list[tuple[list[int], int]], prefix: str) -> list[P.EncodeRequest]:
    return [P.EncodeRequest(req_id=f"{prefix}{i}", prompt_ids=tuple(p), max_new_tokens=n)
            for i, (p, n) in enumerate(work)]


class FakeCoordinator:
    """Just enough coordinator for stage workers: Hello -> Assign (+ the peers refresh once
    every stage is READY), heartbeats, StagePasses to stage 0, PassDones back."""

    def __init__(self, tmp: Path, model: dict[str, Any], stages: list[tuple[int, int]],
                 tp_sizes: list[int]) -> None:
        self.endpoint = f"ipc://{tmp}/coord"
        self.sock = make_socket(zmq.Context.instance(), "ROUTER", bind=self.endpoint)
        self.model, self.stages, self.tp_sizes = model, stages, tp_sizes
        self.workers: dict[str, tuple[int, int]] = {}  # worker id -> (stage, tp_rank)
        self.ready: dict[str, str | None] = {}  # worker id -> kv endpoint
        self.done: list[P.PassDone] = []
        self._last_beat = 0.0

    def send(self, worker_id: str, msg: P.Message) -> None:
        self.sock.send_multipart([worker_id.encode(), *P.encode(msg)])

    def poll(self, timeout_s: float, until: Callable[[], bool] = lambda: False) -> None:
        """Answer whatever arrives for ``timeout_s`` or until ``until()`` (heartbeats keep the
        workers alive)."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if self.sock.poll(int(min(left, 0.2) * 1000), zmq.POLLIN):
                ident, *frames = self.sock.recv_multipart()
                self._on(ident.decode(), P.decode(frames))
                if until():
                    return
            if time.monotonic() - self._last_beat > 0.3:
                self._last_beat = time.monotonic()
                for w in self.workers:
                    self.send(w, P.Heartbeat(worker_id="coord", seq=0, t_sent=time.time()))

    def _on(self, worker_id: str, msg: P.Message) -> None:
        if isinstance(msg, P.Hello) and worker_id not in self.workers:
            stage = int(msg.capacity["stage"])
            self.workers[worker_id] = (stage, msg.tp_rank)
            self.send(worker_id, self._assign(worker_id, stage, msg.tp_rank))
        elif isinstance(msg, P.Ready):
            self.ready[worker_id] = msg.kv_endpoint
        elif isinstance(msg, P.PassDone):
            self.done.append(msg)
        elif isinstance(msg, P.Error):
            raise AssertionError(f"worker {worker_id} sent {msg}")

    def _assign(self, worker_id: str, stage: int, tp_rank: int, peers: dict[str, str] | None = None,
                ) -> P.Assign:
        return P.Assign(worker_id=worker_id, role="pipeline", group=stage, tp_rank=tp_rank,
                        tp_size=self.tp_sizes[stage], layer_range=self.stages[stage],
                        peers=peers or {}, heartbeat_interval_s=0.3,
                        config={"model": self.model, "pipeline": {
                            "stage": stage, "num_stages": len(self.stages)}})

    def start(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.ready) < sum(self.tp_sizes):
            assert time.monotonic() < deadline, f"only {sorted(self.ready)} became ready"
            self.poll(0.2)
        first = {s: w for w, (s, rank) in self.workers.items() if rank == 0}
        for s in range(len(self.stages) - 1):
            nxt = self.ready[first[s + 1]]
            assert nxt is not None
            self.send(first[s], self._assign(first[s], s, 0, {"next": nxt}))
        self.stage0 = first[0]

    def pass_(self, sp: P.StagePass) -> None:
        self.send(self.stage0, sp)

    def wait_done(self, count: int, timeout_s: float) -> list[P.PassDone]:
        deadline = time.monotonic() + timeout_s
        while len(self.done) < count:
            assert time.monotonic() < deadline, f"{len(self.done)} of {count} PassDones came"
            self.poll(0.1, until=lambda: len(self.done) >= count)
        out, self.done = self.done[:count], self.done[count:]
        return out


def spawn(coord: FakeCoordinator, tmp: Path, stage: int, extra: list[str],
           tp: tuple[int, int, str | None] = (0, 1, None)) -> subprocess.Popen:
    rank, size, init = tp
    name = f"st{stage}r{rank}"
    cmd = [sys.executable, "-m", "decoder_worker", "--role", "pipeline", "--stage", str(stage),
           "--coordinator", coord.endpoint, "--worker-id", name,
           "--kv-bind", f"ipc://{tmp}/kv-{name}", "--heartbeat-interval", "0.3",
           "--tp-rank", str(rank), "--tp-size", str(size), *extra]
    if init:
        cmd += ["--tp-init", init]
    env = {**os.environ, "EXEGPT_RUNS_DIR": str(tmp / "runs"), "EXEGPT_RUN_ID": "t",
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stderr=(tmp / f"{name}.err").open("w"),
                            cwd=Path(__file__).resolve().parents[2])


def stop(coord: FakeCoordinator, procs: list[subprocess.Popen], tmp: Path) -> None:
    for w in coord.ready:
        coord.send(w, P.Shutdown(reason="test done"))
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=60))
        except Exception:  # noqa: BLE001 - a hung worker must not outlive the test
            proc.kill()
            codes.append(None)
    coord.sock.close(linger=0)
    errs = {p.name: p.read_text()[-2000:] for p in tmp.glob("*.err")}
    assert codes == [0] * len(procs), errs


def generate(coord: FakeCoordinator, streams: dict[int, list[P.EncodeRequest]],
             timeout_s: float) -> dict[str, list[int]]:
    """Every stream encodes its requests, then decodes until all finished; the streams'
    passes are in flight at the same time (one per stream, as the coordinator runs them)."""
    out: dict[str, list[int]] = {}
    last: dict[int, dict[str, int]] = {s: {} for s in streams}
    free: dict[int, tuple[str, ...]] = {s: () for s in streams}
    pass_ids = iter(range(10_000))
    for s, reqs in streams.items():
        coord.pass_(P.StagePass(pass_id=next(pass_ids), stream=s, kind="encode",
                                req_ids=tuple(r.req_id for r in reqs), requests=tuple(reqs)))
    inflight = len(streams)
    while inflight:
        done = coord.wait_done(1, timeout_s)[0]
        inflight -= 1
        assert done.error is None, done.error
        assert len(done.stage_times) == len(coord.stages)
        for u in done.updates:
            out.setdefault(u.req_id, []).extend(u.tokens)
            last[done.stream][u.req_id] = u.tokens[-1]
            if u.finished:
                del last[done.stream][u.req_id]
        free[done.stream] = tuple(u.req_id for u in done.updates if u.finished)
        ids = tuple(last[done.stream])
        if ids or free[done.stream]:
            coord.pass_(P.StagePass(pass_id=next(pass_ids), stream=done.stream, kind="decode",
                                    req_ids=ids, tokens=tuple(last[done.stream][r] for r in ids),
                                    free=free[done.stream]))
            inflight += 1
    return out


