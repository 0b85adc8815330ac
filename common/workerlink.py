"""A worker's I/O thread: every socket, the handshake and heartbeats, off the compute loop.

    coordinator ROUTER <--DEALER--+                      +--> inbox (queue.Queue) --> compute loop
    encoders' DEALERs --> ROUTER -+-- I/O thread (poll) -+
    (decoder's KV endpoint)       +-- DEALER per decoder <-- inproc PULL <-- compute loop sends

A pipeline stage worker uses the same two paths: its KV endpoint takes StagePasses from the
previous stage, and ``send(msg, decoder_id="next")`` reaches the peer the coordinator named
"next" (the next stage's KV endpoint). The KV endpoint paths live in common/workerkv.py
(a mixin: same thread, same state).

The compute loop never touches a socket: it takes decoded messages from ``inbox`` and hands
outgoing ones to :meth:`WorkerLink.send` (encoded on the compute thread, forwarded over an
inproc pipe). The I/O thread answers what needs no math itself: heartbeats, ``Assign`` updates
of the peer table, and malformed messages (an ``Error`` back to the sender).

Losing the coordinator (e.g. its restart on the same endpoint): heartbeats, the deadline and
the rejoin live in common/workerlink_liveness.py (a mixin, like workerkv: same thread, same
state); ``Stop`` and ``Rejoin`` are defined there and importable from here.

A worker the coordinator declared lost (an ``unavailable`` Error while ASSIGNED: it was silent
past its deadline, e.g. stalled, and its requests were re-run elsewhere or failed) rejoins the
same way, as a fresh worker; a TP rank stops instead (its group was dropped as a whole and the
other ranks may be dead, so its collectives could hang): its supervisor restarts the group.

Failing fast: a worker whose compute fails (e.g. a TP collective whose peer rank died) calls
:meth:`WorkerLink.goodbye` before exiting: an ``Error("worker_lost")`` without a req_id, on
which the coordinator drops the worker's whole TP group at once (no heartbeat-deadline wait).
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from common import protocol as P
from common.errors import ProtocolError
from common.faults import Faults, KVFaults
from common.logbudget import LogLimiter
from common.sockets import load_curve_client, make_socket
from common.workerconfig import WorkerConfig
from common.workerkv import KVPaths
from common.workerlink_liveness import Liveness, Rejoin, Stop

__all__ = ["Rejoin", "Stop", "WorkerLink"]  # Stop / Rejoin: defined in workerlink_liveness

_TO_COORDINATOR = b"C"
_TO_DECODER = b"K"
_GOODBYE = b"G"  # to the coordinator, then the link is told it left (goodbye())
GOODBYE_WAIT_S = 1.0  # how long a failing worker waits for its goodbye to leave
COORDINATOR_HWM = 100  # messages queued towards the coordinator before we hold back
OUTBOX_HWM = 64  # compute-thread messages waiting for the I/O thread (then send() blocks)
BACKLOG_LIMIT = 16  # held-back coordinator messages before the outbox stops being read
# Assign fields that fix what a worker built (its backend): a re-Assign must keep them
PLACEMENT = ("role", "group", "tp_rank", "tp_size", "layer_range", "encoder_layer_range")


class WorkerLink(KVPaths, Liveness):
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
        self._instance: str | None = None  # the coordinator instance that assigned us
        self._rejoining_since: float | None = None  # monotonic; None while assigned
        self._backoff = cfg.heartbeat_interval_s
        self._ready_info: dict[str, Any] = {}
        self.dropped = 0  # messages of a lost coordinator's run dropped while rejoining
        self.limited = LogLimiter(log)  # per-message warnings a peer could flood
        self._faults = KVFaults(Faults.from_env())  # EXEGPT_FAULTS (tests, soaks)
        if self._faults.faults.active:
            log.warning("faults_injected", faults=str(self._faults.faults))
        self._peers: dict[str, str] = {}
        self._thread = threading.Thread(target=self._run, name="worker-io", daemon=True)
        self._coord = self._make_coordinator_socket()
        # an encoder with --kv-bind binds too: it may be switched to the decoder role
        self._kv_in = self._bind_kv() if cfg.kv_bind else None
        self._kv_out: dict[str, zmq.Socket] = {}
        self._goodbye_pending = False  # I/O thread: a goodbye is queued towards the coordinator
        self._goodbye_sent = threading.Event()

    # ---- compute-thread API ---------------------------------------------------------------
    def start(self) -> P.Assign:
        """Send HELLO, start the I/O thread and wait for the coordinator's Assign."""
        self._thread.start()
        if not self._assigned.wait(self.cfg.startup_timeout_s):
            raise TimeoutError(f"no Assign from the coordinator at {self.cfg.coordinator} within "
                               f"{self.cfg.startup_timeout_s:.0f} s; is it running?"
                               + (" (or did it refuse this worker's CURVE key?)"
                                  if self.cfg.curve_key else ""))
        assert self._assign is not None
        return self._assign

    def ready(self, info: dict[str, Any]) -> None:
        self._ready_info = dict(info)  # said again to a restarted coordinator
        self.send(P.Ready(worker_id=self.cfg.worker_id, kv_endpoint=self.kv_endpoint, info=info))

    @property
    def congested(self) -> bool:
        """True while the coordinator reads slower than we send (compute may coalesce)."""
        return bool(self._backlog)

    def send(self, msg: P.Message, decoder_id: str | None = None) -> None:
        """Queue ``msg`` for the coordinator, or for ``decoder_id``'s KV endpoint."""
        dest = _TO_COORDINATOR if decoder_id is None else _TO_DECODER + decoder_id.encode()
        self._push.send_multipart([dest, *P.encode(msg)], copy=False)

    def goodbye(self, why: str) -> bool:
        """Tell the coordinator this worker is failing (and exiting) now, so it drops the
        worker's whole TP group and re-runs its requests at once instead of waiting out the
        heartbeat deadline: an ``Error("worker_lost")`` without a req_id. True once it left."""
        if not self._thread.is_alive() or self._stop.is_set():
            return False
        self._push.send_multipart([_GOODBYE, *P.encode(P.Error(
            code="worker_lost", message=f"{self.cfg.worker_id}: {why}"))], copy=False)
        return self._goodbye_sent.wait(GOODBYE_WAIT_S)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for sock in [self._push, self._pull, self._kv_in, *self._kv_out.values()]:
            if sock is not None:
                sock.close(linger=0)
        # a goodbye handed to zmq must still reach the coordinator (bounded)
        self._coord.close(linger=int(GOODBYE_WAIT_S * 1000) if self._goodbye_sent.is_set()
                          else 0)

    # ---- sockets --------------------------------------------------------------------------
    def _make_coordinator_socket(self) -> zmq.Socket:
        curve = (load_curve_client(self.cfg.curve_key, self.cfg.curve_server_public)
                 if self.cfg.curve_key and self.cfg.curve_server_public else None)
        return make_socket(self._ctx, "DEALER", connect=self.cfg.coordinator,
                           identity=self.cfg.worker_id, hwm=COORDINATOR_HWM, curve_client=curve)

    # ---- I/O thread -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # noqa: BLE001 - the worker must hear about any I/O failure
            self.log.exception("io_thread_failed")
            self.inbox.put(Stop(f"I/O thread failed: {exc!r}", error=True))

    def _loop(self) -> None:
        """Poll; the outbox is read only while the coordinator keeps up (backpressure)."""
        self._poller = poller = zmq.Poller()
        for sock in (self._coord, self._pull, self._kv_in):
            if sock is not None:
                poller.register(sock, zmq.POLLIN)
        self._send_hello()
        interval = self.cfg.heartbeat_interval_s
        self._last_heard = next_beat = time.monotonic()
        beat_seq = 0
        while not self._stop.is_set():
            self._watch(poller)
            events = dict(poller.poll(timeout=max(1, int(interval * 250))))
            if events.get(self._coord, 0) & zmq.POLLIN:
                self._last_heard = time.monotonic()
                self._drain_coordinator()
            self._flush_backlog()
            if self._pull in events:
                self._drain_outbox()
            if self._goodbye_pending and not self._backlog:
                self._goodbye_sent.set()
            if self._kv_in is not None and self._kv_in in events:
                self._drain_kv()
            now = time.monotonic()
            for peer, frames in self._faults.due(now):
                self._send_kv(peer, frames, injected=True)
            if now >= next_beat:
                interval, beat_seq = self._beat(beat_seq)
                next_beat = now + interval
                self.limited.flush()
            if self._check_deadline(now):
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

    def _drain_coordinator(self) -> None:
        while True:
            try:
                frames = self._coord.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                msg = P.decode(frames)
            except ProtocolError as exc:
                self.limited.warning("bad_message_from_coordinator", error=str(exc))
                self._to_coordinator(P.encode(P.Error(
                    code="protocol_error", message=str(exc), req_id=P.peek_req_id(frames))))
                continue
            self._on_coordinator(msg)

    def _on_coordinator(self, msg: P.Message) -> None:
        if isinstance(msg, P.Heartbeat):
            if self._rejoining_since is None and self._other_instance(msg.load):
                self._rejoin(f"a new coordinator instance ({msg.load['instance']})")
            return
        if isinstance(msg, P.Error) and msg.code == "unavailable" and msg.req_id is None:
            if self._rejoining_since is not None:
                return  # the new instance does not know us yet: our Hello is on its way
            if self.cfg.tp_size == 1:  # declared lost: come back as a fresh worker
                self._rejoin(f"coordinator: {msg.message}")
                return
            # a TP rank: the coordinator dropped our whole group, whose other ranks may be
            # dead (our collectives would hang); stop, the supervisor restarts the group
            self.inbox.put(Stop(f"coordinator: {msg.message}", error=True))
            self._stop.set()
            return
        if isinstance(msg, P.Assign):
            self._on_assign(msg)
            return
        if self._rejoining_since is not None:
            self.dropped += 1  # the old run's work, still in flight
            return
        self.inbox.put(msg)

    def _other_instance(self, info: Any) -> bool:
        theirs = info.get("instance") if isinstance(info, dict) else None
        return theirs is not None and self._instance is not None and theirs != self._instance

    def _on_assign(self, msg: P.Assign) -> None:
        first = self._assign is None
        rejoined = not first and (self._rejoining_since is not None
                                  or self._other_instance(msg.config))
        if rejoined and not self._same_placement(msg):
            return
        old, self._peers = self._peers, dict(msg.peers)
        for gone in [p for p in self._kv_out if self._peers.get(p) != old.get(p)]:
            self._kv_out.pop(gone).close(linger=0)  # lost or moved peers: drop queued KV
        self._assign = msg
        if isinstance(msg.config.get("instance"), str):
            self._instance = msg.config["instance"]
        if rejoined:
            self.log.info("rejoined", instance=self._instance, dropped=self.dropped,
                          seconds=round(time.monotonic() - (self._rejoining_since or 0), 3))
            self._rejoining_since = None
            self._to_coordinator(P.encode(P.Ready(worker_id=self.cfg.worker_id,
                                                  kv_endpoint=self.kv_endpoint,
                                                  info=self._ready_info)))
        elif not first and ("relayout" in msg.config or "role_switch" in msg.config):
            self.inbox.put(msg)  # a live re-layout / role switch: the loop rebuilds
        self._assigned.set()

    def _same_placement(self, msg: P.Assign) -> bool:
        """A restarted coordinator must give us the place our backend was built for."""
        assert self._assign is not None
        keys = [k for k in PLACEMENT if getattr(msg, k) != getattr(self._assign, k)]
        keys += [k for k in ("model", "pipeline") if msg.config.get(k) !=
                 self._assign.config.get(k)]
        if keys:
            self.inbox.put(Stop(f"the restarted coordinator assigned a different {keys} "
                                "than this worker was built for; restart the worker", True))
            self._stop.set()
        return not keys

    def _drain_outbox(self) -> None:
        while True:
            try:
                dest, *frames = self._pull.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if self._rejoining_since is not None:
                self.dropped += 1  # results of the lost coordinator's run
                continue
            tag = dest.bytes
            self._goodbye_pending |= tag == _GOODBYE
            if tag in (_TO_COORDINATOR, _GOODBYE):
                self._to_coordinator(frames)
                if len(self._backlog) >= BACKLOG_LIMIT:
                    return
                continue
            self._send_kv(tag[1:].decode(), frames)
