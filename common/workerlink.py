"""A worker's I/O thread: every socket, the handshake and heartbeats, off the compute loop.

    coordinator ROUTER <--DEALER--+                      +--> inbox (queue.Queue) --> compute loop
    encoders' DEALERs --> ROUTER -+-- I/O thread (poll) -+
    (decoder's KV endpoint)       +-- DEALER per decoder <-- inproc PULL <-- compute loop sends

A pipeline stage worker uses the same two paths: its KV endpoint takes StagePasses from the
previous stage, and ``send(msg, decoder_id="next")`` reaches the peer the coordinator named
"next" (the next stage's KV endpoint).

The compute loop never touches a socket: it takes decoded messages from ``inbox`` and hands
outgoing ones to :meth:`WorkerLink.send` (encoded on the compute thread, forwarded over an
inproc pipe). The I/O thread answers what needs no math itself: heartbeats (and the
coordinator's deadline: no message from it for ``heartbeat_timeout_s`` and the worker stops),
``Assign`` updates of the peer table, and malformed messages (an ``Error`` back to the sender).
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from common import protocol as P
from common.errors import ProtocolError
from common.sockets import bound_endpoint, load_curve_client, make_socket
from common.workerconfig import WorkerConfig

_TO_COORDINATOR = b"C"
_TO_DECODER = b"K"
COORDINATOR_HWM = 100  # messages queued towards the coordinator before we hold back
OUTBOX_HWM = 64  # compute-thread messages waiting for the I/O thread (then send() blocks)
BACKLOG_LIMIT = 16  # held-back coordinator messages before the outbox stops being read
KV_SEND_TIMEOUT_MS = 2000


@dataclass(frozen=True)
class Stop:
    """Put on the inbox when the worker must stop: why, and whether that is an error."""

    reason: str
    error: bool


class WorkerLink:
    """Owns the worker's sockets on one I/O thread; see the module docstring."""

    def __init__(self, cfg: WorkerConfig, log: Any) -> None:
        self.cfg = cfg
        self.log = log
        self.inbox: queue.Queue[P.Message | Stop] = queue.Queue()
        self.load: Callable[[], dict[str, Any]] = dict
        self.kv_endpoint: str | None = None
        self._ctx = zmq.Context.instance()
        self._pipe_addr = f"inproc://worker-out-{id(self)}"
        self._pull = make_socket(self._ctx, "PULL", bind=self._pipe_addr, hwm=OUTBOX_HWM)
        # used by the compute thread only (a zmq socket belongs to one thread)
        self._push = make_socket(self._ctx, "PUSH", connect=self._pipe_addr, hwm=OUTBOX_HWM)
        self._backlog: collections.deque[list[Any]] = collections.deque()
        self._stop = threading.Event()
        self._assigned = threading.Event()
        self._assign: P.Assign | None = None
        self._peers: dict[str, str] = {}
        self._thread = threading.Thread(target=self._run, name="worker-io", daemon=True)
        self._coord = self._make_coordinator_socket()
        self._kv_in = self._bind_kv() if cfg.role in ("decoder", "pipeline") else None
        self._kv_out: dict[str, zmq.Socket] = {}

    # ---- compute-thread API ---------------------------------------------------------------
    def start(self) -> P.Assign:
        """Send HELLO, start the I/O thread and wait for the coordinator's Assign."""
        self._thread.start()
        if not self._assigned.wait(self.cfg.startup_timeout_s):
            raise TimeoutError(f"no Assign from the coordinator at {self.cfg.coordinator} within "
                               f"{self.cfg.startup_timeout_s:.0f} s; is it running?")
        assert self._assign is not None
        return self._assign

    def ready(self, info: dict[str, Any]) -> None:
        self.send(P.Ready(worker_id=self.cfg.worker_id, kv_endpoint=self.kv_endpoint, info=info))

    @property
    def congested(self) -> bool:
        """True while the coordinator reads slower than we send (compute may coalesce)."""
        return bool(self._backlog)

    def send(self, msg: P.Message, decoder_id: str | None = None) -> None:
        """Queue ``msg`` for the coordinator, or for ``decoder_id``'s KV endpoint."""
        dest = _TO_COORDINATOR if decoder_id is None else _TO_DECODER + decoder_id.encode()
        self._push.send_multipart([dest, *P.encode(msg)], copy=False)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for sock in [self._push, self._pull, self._coord, self._kv_in, *self._kv_out.values()]:
            if sock is not None:
                sock.close(linger=0)

    # ---- sockets --------------------------------------------------------------------------
    def _make_coordinator_socket(self) -> zmq.Socket:
        curve = (load_curve_client(self.cfg.curve_key, self.cfg.curve_server_public)
                 if self.cfg.curve_key and self.cfg.curve_server_public else None)
        return make_socket(self._ctx, "DEALER", connect=self.cfg.coordinator,
                           identity=self.cfg.worker_id, hwm=COORDINATOR_HWM, curve_client=curve)

    def _bind_kv(self) -> zmq.Socket:
        assert self.cfg.kv_bind is not None
        sock = make_socket(self._ctx, "ROUTER", bind=self.cfg.kv_bind)
        self.kv_endpoint = advertised(bound_endpoint(sock), self.cfg.kv_advertise)
        return sock

    def _kv_socket(self, decoder_id: str) -> zmq.Socket | None:
        sock = self._kv_out.get(decoder_id)
        endpoint = self._peers.get(decoder_id)
        if sock is None and endpoint is not None:
            sock = make_socket(self._ctx, "DEALER", connect=endpoint,
                               identity=self.cfg.worker_id, sndtimeo_ms=KV_SEND_TIMEOUT_MS)
            self._kv_out[decoder_id] = sock
        return sock

    # ---- I/O thread -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # noqa: BLE001 - the worker must hear about any I/O failure
            self.log.exception("io_thread_failed")
            self.inbox.put(Stop(f"I/O thread failed: {exc!r}", error=True))

    def _loop(self) -> None:
        """Poll; the outbox is read only while the coordinator keeps up (backpressure)."""
        poller = zmq.Poller()
        for sock in (self._coord, self._pull, self._kv_in):
            if sock is not None:
                poller.register(sock, zmq.POLLIN)
        self._send_hello()
        interval = self.cfg.heartbeat_interval_s
        last_heard = next_beat = time.monotonic()
        beat_seq = 0
        while not self._stop.is_set():
            self._watch(poller)
            events = dict(poller.poll(timeout=max(1, int(interval * 250))))
            if events.get(self._coord, 0) & zmq.POLLIN:
                last_heard = time.monotonic()
                self._drain_coordinator()
            self._flush_backlog()
            if self._pull in events:
                self._drain_outbox()
            if self._kv_in is not None and self._kv_in in events:
                self._drain_kv()
            now = time.monotonic()
            if now >= next_beat:
                interval, beat_seq = self._beat(beat_seq)
                next_beat = now + interval
            if now - last_heard > self._deadline():
                self.inbox.put(Stop(f"coordinator silent for {now - last_heard:.1f} s", True))
                return

    def _watch(self, poller: zmq.Poller) -> None:
        poller.modify(self._coord, zmq.POLLIN | (zmq.POLLOUT if self._backlog else 0))
        poller.modify(self._pull, zmq.POLLIN if len(self._backlog) < BACKLOG_LIMIT else 0)

    def _to_coordinator(self, frames: list[Any]) -> None:
        if not self._backlog:
            try:
                self._coord.send_multipart(frames, zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                pass
        self._backlog.append(frames)

    def _flush_backlog(self) -> None:
        while self._backlog:
            try:
                self._coord.send_multipart(self._backlog[0], zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._backlog.popleft()

    def _deadline(self) -> float:
        return self.cfg.heartbeat_timeout_s if self._assigned.is_set() else \
            self.cfg.startup_timeout_s

    def _send_hello(self) -> None:
        hello = P.Hello(worker_id=self.cfg.worker_id, role=self.cfg.role,
                        tp_rank=self.cfg.tp_rank, tp_size=self.cfg.tp_size,
                        device=self.cfg.device, pid=os.getpid(), host=socket.gethostname(),
                        kv_endpoint=self.kv_endpoint, capacity=self._capacity())
        self._to_coordinator(P.encode(hello))

    def _capacity(self) -> dict[str, Any]:
        if self.cfg.role == "pipeline":
            return {"max_seqs": self.cfg.capacity, "stage": self.cfg.stage}
        return {"max_seqs": self.cfg.capacity}

    def _beat(self, seq: int) -> tuple[float, int]:
        if not self._assigned.is_set():
            self._send_hello()  # the coordinator may have started after us
            return self.cfg.heartbeat_interval_s, seq
        beat = P.Heartbeat(worker_id=self.cfg.worker_id, seq=seq, t_sent=time.time(),
                           load=self.load())
        self._to_coordinator(P.encode(beat))
        assert self._assign is not None
        return self._assign.heartbeat_interval_s, seq + 1

    def _drain_coordinator(self) -> None:
        while True:
            try:
                frames = self._coord.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                msg = P.decode(frames)
            except ProtocolError as exc:
                self.log.warning("bad_message_from_coordinator", error=str(exc))
                self._to_coordinator(P.encode(P.Error(
                    code="protocol_error", message=str(exc), req_id=P.peek_req_id(frames))))
                continue
            self._on_coordinator(msg)

    def _on_coordinator(self, msg: P.Message) -> None:
        if isinstance(msg, P.Heartbeat):
            return
        if isinstance(msg, P.Error) and msg.code == "unavailable" and msg.req_id is None:
            # the coordinator declared us lost (we were silent too long): stop, do not linger
            self.inbox.put(Stop(f"coordinator: {msg.message}", error=True))
            self._stop.set()
            return
        if isinstance(msg, P.Assign):
            old, self._peers = self._peers, dict(msg.peers)
            for gone in [p for p in self._kv_out if self._peers.get(p) != old.get(p)]:
                self._kv_out.pop(gone).close(linger=0)  # lost or moved peers: drop queued KV
            first = self._assign is None
            self._assign = msg
            if first:
                self._assigned.set()
            return
        self.inbox.put(msg)

    def _drain_outbox(self) -> None:
        while True:
            try:
                dest, *frames = self._pull.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            tag = dest.bytes
            if tag == _TO_COORDINATOR:
                self._to_coordinator(frames)
                if len(self._backlog) >= BACKLOG_LIMIT:
                    return
                continue
            self._send_kv(tag[1:].decode(), frames)

    def _send_kv(self, decoder_id: str, frames: list[Any]) -> None:
        sock = self._kv_socket(decoder_id)
        if sock is None:
            self._report_no_route(decoder_id, "has no KV endpoint for", frames)
            return
        try:
            sock.send_multipart(frames, copy=False)
        except zmq.Again:  # the decoder stopped reading for KV_SEND_TIMEOUT_MS
            self._report_no_route(decoder_id, "timed out sending KV to", frames)

    def _report_no_route(self, decoder_id: str, what: str, frames: list[Any]) -> None:
        if self.cfg.role == "pipeline":
            self._report_stage_pass_lost(decoder_id, what, frames)
            return
        req_id = P.peek_req_id(frames)
        self.log.error("kv_handoff_failed", decoder=decoder_id, req_id=req_id, why=what)
        self._to_coordinator(P.encode(P.Error(
            code="internal", req_id=req_id,
            message=f"encoder {self.cfg.worker_id} {what} decoder {decoder_id}")))

    def _report_stage_pass_lost(self, peer: str, what: str, frames: list[Any]) -> None:
        """A pass that cannot reach the next stage fails like a bad pass: PassDone(error)."""
        msg = P.decode(frames)  # our own compute thread encoded it
        assert isinstance(msg, P.StagePass)
        self.log.error("stage_pass_lost", peer=peer, pass_id=msg.pass_id, why=what)
        self._to_coordinator(P.encode(P.PassDone(
            worker_id=self.cfg.worker_id, pass_id=msg.pass_id, stream=msg.stream, kind=msg.kind,
            error=f"stage worker {self.cfg.worker_id} {what} peer {peer!r}")))

    def _drain_kv(self) -> None:
        assert self._kv_in is not None
        while True:
            try:
                sender, *frames = self._kv_in.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                msg = P.decode(frames)
                want = P.StagePass if self.cfg.role == "pipeline" else P.KVHandoff
                if not isinstance(msg, want):
                    raise ProtocolError(f"the KV endpoint takes {want.__name__}, got "
                                        f"{type(msg).__name__}")
            except ProtocolError as exc:
                self.log.warning("bad_kv_message", error=str(exc))
                with contextlib.suppress(zmq.Again):
                    self._kv_in.send_multipart([sender, *P.encode(P.Error(
                        code="protocol_error", message=str(exc),
                        req_id=P.peek_req_id(frames)))], zmq.NOBLOCK)
                continue
            self.inbox.put(msg)


def advertised(bound: str, advertise: str | None) -> str:
    """The KV endpoint peers should connect to: an explicit one, or the bound one with a
    wildcard host replaced by this host's name (docker-compose service names resolve)."""
    if advertise:
        return advertise
    if bound.startswith("tcp://0.0.0.0:") or bound.startswith("tcp://*:"):
        return f"tcp://{socket.gethostname()}:{bound.rsplit(':', 1)[1]}"
    return bound

