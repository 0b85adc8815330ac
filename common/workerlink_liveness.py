"""A worker link's coordinator liveness, on its I/O thread (a mixin of WorkerLink).

Hello until assigned, heartbeats once assigned, and what happens when the coordinator is lost
(e.g. its restart on the same endpoint)::

    ASSIGNED --no message for heartbeat_timeout_s, or a Heartbeat/Assign of another
               coordinator instance--> REJOINING: inbox emptied, Rejoin put on it (the loop
               drops every request it holds, freeing KV), a fresh coordinator socket (nothing
               of the old run reaches the new one), Hello with backoff; the old run's traffic
               (outbox, KV endpoint) is dropped
    REJOINING --Assign (same placement)--> ASSIGNED: Ready sent again, serving
    REJOINING --startup_timeout_s without an Assign, or another placement--> Stop (exit 1)

The messages the coordinator sends (Assign, Error, ...) are handled in common/workerlink.py.
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from common import protocol as P
from common.workerconfig import WorkerConfig

HELLO_BACKOFF_MAX_S = 2.0  # re-Hello every interval, doubling up to this, while rejoining


@dataclass(frozen=True)
class Stop:
    """Put on the inbox when the worker must stop: why, and whether that is an error."""

    reason: str
    error: bool


@dataclass(frozen=True)
class Rejoin:
    """Put on the inbox when the coordinator is lost: drop every request held (free its KV);
    the link re-registers with the (restarted) coordinator, which knows none of them."""

    reason: str


class Liveness:
    """The heartbeat / rejoin half of WorkerLink; it owns the state these methods use."""

    cfg: WorkerConfig
    log: Any
    inbox: queue.Queue[Any]
    load: Callable[[], dict[str, Any]]
    kv_endpoint: str | None
    dropped: int
    _assigned: threading.Event
    _assign: P.Assign | None
    _instance: str | None
    _rejoining_since: float | None
    _last_heard: float
    _backoff: float
    _backlog: Any
    _coord: zmq.Socket
    _poller: zmq.Poller

    def _to_coordinator(self, frames: list[Any]) -> None:
        raise NotImplementedError

    def _make_coordinator_socket(self) -> zmq.Socket:
        raise NotImplementedError

    def _check_deadline(self, now: float) -> bool:
        """True when the worker must stop; a silent coordinator once assigned: rejoin."""
        silent = now - self._last_heard
        if self._rejoining_since is not None:
            if now - self._rejoining_since <= self.cfg.startup_timeout_s:
                return False
            self.inbox.put(Stop(f"coordinator gone: no Assign within "
                                f"{self.cfg.startup_timeout_s:.0f} s of re-registering", True))
            return True
        if silent <= self._deadline() or self._coord.poll(0, zmq.POLLIN):
            return False  # (woken from a stall with messages waiting: hear them out first)
        if self._assign is None:
            self.inbox.put(Stop(f"coordinator silent for {silent:.1f} s", True))
            return True
        self._rejoin(f"coordinator silent for {silent:.1f} s")
        return False

    def _rejoin(self, why: str) -> None:
        """Drop the lost coordinator's run and say Hello again (module docstring)."""
        self.log.warning("coordinator_lost", why=why, instance=self._instance)
        self._rejoining_since = self._last_heard = time.monotonic()
        self._assigned.clear()
        with contextlib.suppress(queue.Empty):
            while True:  # what the old coordinator sent us is void now (a Stop still counts)
                item = self.inbox.get_nowait()
                if isinstance(item, Stop):
                    self.inbox.put(item)
                    break
                self.dropped += 1
        self.inbox.put(Rejoin(why))
        self._backlog.clear()
        self._poller.unregister(self._coord)
        self._coord.close(linger=0)
        self._coord = self._make_coordinator_socket()
        self._poller.register(self._coord, zmq.POLLIN)
        self._backoff = self.cfg.heartbeat_interval_s
        self._send_hello()

    def _deadline(self) -> float:
        return self.cfg.heartbeat_timeout_s if self._assigned.is_set() else \
            self.cfg.startup_timeout_s

    def _send_hello(self) -> None:
        role = self.cfg.role  # after a live role switch: the role assigned since
        if self._assign is not None and self._assign.role in ("encoder", "decoder"):
            role = self._assign.role
        hello = P.Hello(worker_id=self.cfg.worker_id, role=role,
                        tp_rank=self.cfg.tp_rank, tp_size=self.cfg.tp_size,
                        device=self.cfg.device, pid=os.getpid(), host=socket.gethostname(),
                        kv_endpoint=self.kv_endpoint, capacity=self._capacity())
        self._to_coordinator(P.encode(hello))

    def _capacity(self) -> dict[str, Any]:
        if self.cfg.role == "pipeline":
            return {"max_seqs": self.cfg.capacity, "stage": self.cfg.stage}
        return {"max_seqs": self.cfg.capacity}

    def _beat(self, seq: int) -> tuple[float, int]:
        if self._rejoining_since is not None:  # backoff with jitter: many workers rejoin
            self._send_hello()
            self._backoff = min(HELLO_BACKOFF_MAX_S, self._backoff * 2)
            return self._backoff * random.uniform(0.8, 1.2), seq
        if not self._assigned.is_set():
            self._send_hello()  # the coordinator may have started after us
            return self.cfg.heartbeat_interval_s, seq
        beat = P.Heartbeat(worker_id=self.cfg.worker_id, seq=seq, t_sent=time.time(),
                           load=self.load())
        self._to_coordinator(P.encode(beat))
        assert self._assign is not None
        return self._assign.heartbeat_interval_s, seq + 1
