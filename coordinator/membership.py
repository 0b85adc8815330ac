"""The coordinator's worker side: handshake, heartbeats, batches out, tokens in, loss.

Startup handshake (per worker process)::

    worker --Hello(role, id, tp rank/size, device, capacity, kv_endpoint)--> coordinator
    worker <--Assign(role, peers, heartbeat interval, config={"model": ...})-- coordinator
    worker --Ready(kv_endpoint)--> coordinator          (backend built, KV socket bound)

Once the expected numbers of encoders and decoders are READY the coordinator starts serving
and reports ``ready`` on the launcher's status pipe. Whenever the set of ready decoders
changes, every encoder gets a fresh Assign whose ``peers`` map decoder id -> KV endpoint (sent
on the same ordered pipe as the EncodeBatches, so an encoder always knows a decoder before a
batch names it). A worker silent for ``heartbeat_timeout_s`` is lost: the requests it held are
answered with a WorkerLost error and the other workers are told to cancel their part.
Two faster paths lead to the same loss: a worker that fails says goodbye (an Error
``worker_lost`` without a req_id, e.g. a TP rank whose collective broke), and a worker process
on this host is watched by a pidfd (coordinator/exitwatch.py), so a SIGKILL is seen at once.

Restarts. Every Heartbeat and Assign names this coordinator's ``instance``. A worker that hears
from another instance (or from nobody for its heartbeat deadline) drops what it held and says
Hello again (common/workerlink.py). A message from a connection this instance never saw (a
worker of the previous instance) is answered with this instance's Heartbeat, which tells the
worker to re-register, and an ``unavailable`` Error; one from a worker this instance declared
lost gets only the Error, which stops that worker (it was silent too long to be trusted).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import TYPE_CHECKING, Any

import zmq

from common import protocol as P
from common.errors import ProtocolError, error_from_code
from common.logbudget import LogLimiter
from common.procs import write_status
from coordinator import layout_state
from coordinator.exitwatch import ExitWatch
from coordinator.registry import PIPELINE_ROLE, ROLES, Registry, WorkerInfo, WorkerState
from coordinator.requests import Request

MAX_LOST_ROUTES = 4096  # connections declared lost that are remembered (and told to stop)

if TYPE_CHECKING:
    from coordinator.server import Coordinator


class Membership:
    def __init__(self, coordinator: Coordinator, sock: zmq.Socket) -> None:
        self.co = coordinator
        self.cfg = coordinator.cfg
        self.log = coordinator.log
        self.sock = sock
        self.registry = Registry()
        self.serving = False
        self._beat_seq = 0
        self.limited = LogLimiter(self.log)  # per-message warnings a peer could flood
        self._lost_routes: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._pids: dict[str, int] = {}  # worker id -> the pid its last Hello named (stats)
        self.draining: set[str] = set()  # decoders leaving their role (adapt_roles): still
        # the encoders' KV routes until their requests are done or migrated
        self.exits = ExitWatch(self._process_exited, self.log)  # local workers: pidfds

    # ---- queries --------------------------------------------------------------------------
    def ready(self, role: str) -> list[WorkerInfo]:
        return self.registry.ready(role)

    def missing_roles(self) -> list[str]:
        if self.co.pipeline is not None:  # a pipeline plan: every stage, or nothing
            ok = self.co.pipeline.stages_ready() or self.co.pipeline.switching  # re-layout
            return [] if ok else [PIPELINE_ROLE]
        return [role for role in ROLES if not self.registry.ready(role)]

    def can_serve(self) -> bool:
        return not self.missing_roles()

    def describe(self) -> list[dict[str, Any]]:
        return [{"worker_id": w.worker_id, "role": w.role, "state": w.state.value,
                 "tp_rank": w.tp_rank, "tp_size": w.tp_size, "capacity": w.capacity,
                 "active": w.num_active, "outstanding_batches": w.outstanding_batches,
                 "kv_endpoint": w.kv_endpoint, "load": w.load, "stage": w.stage,
                 "pid": self._pids.get(w.worker_id)}
                for w in self.registry]

    # ---- sending --------------------------------------------------------------------------
    def send(self, worker: WorkerInfo, msg: P.Message) -> None:
        try:
            self.sock.send_multipart([worker.routing_id, *P.encode(msg)], zmq.NOBLOCK,
                                     copy=False)
        except zmq.ZMQError as exc:
            self.limited.warning("worker_unreachable", worker=worker.worker_id, error=exc.strerror)

    def send_batch(self, encoder: WorkerInfo, batch_id: int,
                   placed: list[tuple[Request, WorkerInfo]]) -> None:
        items = []
        for request, decoder in placed:
            self.co.table.dequeue(request)
            request.start_encode(encoder.worker_id, decoder.worker_id)
            decoder.num_active += 1
            prompt, max_new, offset = request.rerun_input()
            items.append(P.EncodeRequest(
                req_id=request.wire_id, prompt_ids=prompt, sampling=request.sampling,
                max_new_tokens=max_new, decoder_id=decoder.worker_id,
                lifecycle=P.Lifecycle(t_arrival=request.times.t_arrival,
                                      t_queued=request.times.t_queued),
                output_offset=offset))
        encoder.batches_sent += 1
        encoder.outstanding_batches += 1
        encoder.num_active = encoder.outstanding_batches
        self.send(encoder, P.EncodeBatch(batch_id=batch_id, requests=tuple(items)))

    def release(self, request: Request, cancel: bool = False, encoding: bool = False) -> None:
        """Free the decoder slot of a finished/failed request; on failure tell its decoder
        (and its encoder, if the request may still sit in a batch there)."""
        decoder = self.registry.get(request.decoder) if request.decoder else None
        if decoder is not None:
            decoder.num_active = max(0, decoder.num_active - 1)
            if cancel:
                self.send(decoder, P.Cancel(req_id=request.wire_id, reason="released"))
        encoder = self.registry.get(request.encoder) if request.encoder else None
        if encoder is not None and cancel and encoding:
            self.send(encoder, P.Cancel(req_id=request.wire_id, reason="released"))

    def shutdown_all(self, reason: str) -> None:
        self.exits.close()  # the workers exit now as told: not a loss
        for worker in self.registry:
            self.send(worker, P.Shutdown(reason=reason, drain=False))

    # ---- receiving ------------------------------------------------------------------------
    def on_frames(self, frames: list[Any]) -> None:
        route = frames[0].bytes
        try:
            msg = P.decode(frames[1:])
        except ProtocolError as exc:
            self.limited.warning("bad_worker_message", error=str(exc))
            self._send_raw(route, P.Error(code="protocol_error", message=str(exc),
                                          req_id=P.peek_req_id(frames[1:])))
            return
        if isinstance(msg, P.Hello):
            self.on_hello(route, msg)
            return
        worker = self.registry.by_route(route)
        if worker is None:
            self._unknown_route(route)
            return
        worker.last_seen = time.time()
        self._dispatch(worker, msg)

    def _dispatch(self, worker: WorkerInfo, msg: P.Message) -> None:
        if isinstance(msg, P.DecodeTokens):
            self.on_decode_tokens(worker, msg)
        elif isinstance(msg, P.PassDone) and self.co.pipeline is not None:
            self.co.pipeline.on_pass_done(worker, msg)
        elif isinstance(msg, P.Heartbeat):
            self.on_heartbeat(worker, msg)
        elif isinstance(msg, P.Ready):
            self.on_ready(worker, msg)
        elif isinstance(msg, P.Error):
            self.on_worker_error(worker, msg)
        else:
            self.limited.warning("unexpected_worker_message", worker=worker.worker_id,
                             type=type(msg).__name__)

    def _unknown_route(self, route: bytes) -> None:
        """A worker we declared lost is told so (it stops); any other unknown sender (a
        worker of a previous coordinator instance) first gets our Heartbeat: re-register."""
        if route in self._lost_routes:
            self._send_raw(route, P.Error(code="unavailable", message="unknown worker: you "
                                          "were declared lost (silent past the deadline)"))
            return
        self._send_raw(route, self._heartbeat(time.time()))
        self._send_raw(route, P.Error(code="unavailable", message=f"unknown worker: send "
                                      f"Hello first (coordinator instance "
                                      f"{self.co.instance})"))

    def _heartbeat(self, now: float) -> P.Heartbeat:
        return P.Heartbeat(worker_id="coordinator", seq=self._beat_seq, t_sent=now,
                           load={"in_flight": len(self.co.table), "instance": self.co.instance})

    def _send_raw(self, route: bytes, msg: P.Message) -> None:
        try:
            self.sock.send_multipart([route, *P.encode(msg)], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:
            pass

    def on_hello(self, route: bytes, msg: P.Hello) -> None:
        roles = ROLES if self.co.pipeline is None else (PIPELINE_ROLE,)
        role = msg.role if msg.role in roles else None
        if role is None:
            self._send_raw(route, P.Error(code="bad_request", message=f"this coordinator runs "
                                          f"a {self.cfg.policy} plan: it assigns "
                                          f"{'/'.join(roles)} roles, not {msg.role!r}"))
            return
        placed = layout_state.placed(self.co, msg)  # a live re-layout's place (restart)
        try:
            stage = (placed.stage if placed is not None else self.co.pipeline.stage_of(msg)
                     if self.co.pipeline is not None else None)
        except ValueError as exc:
            self._send_raw(route, P.Error(code="bad_request", message=str(exc)))
            return
        capacity = layout_state.hello_capacity(msg, placed)  # a switched role's, recorded
        if type(capacity) is not int or capacity < 1:
            self._send_raw(route, P.Error(code="bad_request", message="Hello.capacity must be "
                                          "a map with a positive int max_seqs"))
            return
        self._lost_routes.pop(route, None)
        old = self.registry.get(msg.worker_id)
        if old is not None and old.routing_id == route and old.state is not WorkerState.READY:
            old.last_seen = time.time()  # a repeated Hello (queued while we were away)
            self.send(old, self._assign(old))
            return
        if old is not None:  # a new session of a known worker: what it held is gone
            self.lose(old, "re-registered")
        info = WorkerInfo(worker_id=msg.worker_id, role=role, routing_id=route,
                          tp_rank=msg.tp_rank, tp_size=msg.tp_size, device=msg.device,
                          capacity=capacity,
                          kv_endpoint=msg.kv_endpoint, last_seen=time.time(), stage=stage,
                          tp_group=placed.tp_group if placed is not None else None)
        self.registry.add(info)
        self._pids[msg.worker_id] = msg.pid
        self.exits.watch(msg.worker_id, msg.pid, msg.host)
        self.log.info("worker_hello", worker=msg.worker_id, worker_role=role, worker_pid=msg.pid,
                      host=msg.host, tp_rank=msg.tp_rank, tp_size=msg.tp_size)
        write_status(self.cfg.ready_fd, "hello", worker=msg.worker_id, role=role)
        self.send(info, self._assign(info))

    def _assign(self, info: WorkerInfo) -> P.Assign:
        """The worker's Assign, naming this instance (a worker re-registers on a change)."""
        if self.co.pipeline is not None:
            assign = self.co.pipeline.assign(info)
            return dataclasses.replace(assign, config={**assign.config,
                                                       "instance": self.co.instance})
        peers = ({d.worker_id: d.kv_endpoint for d in self.registry if d.role == "decoder"
                  and d.kv_endpoint and (d.state is WorkerState.READY
                                         or d.worker_id in self.draining)}
                 if info.role == "encoder" else {})
        return P.Assign(worker_id=info.worker_id, role=info.role, tp_rank=info.tp_rank,
                        tp_size=info.tp_size, peers=peers,
                        heartbeat_interval_s=self.cfg.heartbeat_interval_s,
                        config={"model": self.co.model.to_dict(),
                                "instance": self.co.instance,
                                # adapting: keep the weights in host memory (role switch)
                                "host_weights": bool(self.cfg.adapt)})

    def on_ready(self, worker: WorkerInfo, msg: P.Ready) -> None:
        worker.state = WorkerState.READY
        if msg.kv_endpoint:
            worker.kv_endpoint = msg.kv_endpoint
        self.log.info("worker_ready", worker=worker.worker_id, worker_role=worker.role,
                      kv_endpoint=worker.kv_endpoint)
        if worker.role == "decoder":
            self._update_encoders()
        if self.co.pipeline is not None:
            self.co.pipeline.on_stage_ready(worker, msg.info)  # peers refresh; re-layout
        roles = getattr(self.co.adapter, "roles", None)  # a live role switch (adapt_roles)
        if roles is None or not roles.on_ready(worker, msg.info or {}):
            self._replan("join", worker)  # a replacement or a rejoin (not the startup ones)
        self._check_serving()

    def _update_encoders(self) -> None:
        for encoder in self.registry:
            if encoder.role == "encoder":
                self.send(encoder, self._assign(encoder))

    def _check_serving(self) -> None:
        if self.serving:
            return
        if self.co.pipeline.stages_ready() if self.co.pipeline is not None else \
                self._waa_ready():
            self.serving = True
            self.log.info("serving", workers=len(self.registry))
            write_status(self.cfg.ready_fd, "ready", client_endpoint=self.co.client_endpoint,
                         worker_endpoint=self.co.worker_endpoint, workers=self.describe())

    def _waa_ready(self) -> bool:
        """The launch's encoders and decoders are ready; adapting, the same number of workers
        in another split also serves (roles switched live before a restart: adapt_roles)."""
        need = {"encoder": self.cfg.num_encoders, "decoder": self.cfg.num_decoders}
        ready = {role: self.registry.count_ready(role) for role in need}
        if all(ready[role] >= n for role, n in need.items()):
            return True
        return bool(self.cfg.adapt) and min(ready.values()) >= 1 and \
            sum(ready.values()) >= sum(need.values())

    def on_heartbeat(self, worker: WorkerInfo, msg: P.Heartbeat) -> None:
        if isinstance(msg.load, dict):
            worker.load = msg.load
            self.co.metrics.on_worker_load(worker.worker_id, msg.load)
        done = worker.load.get("batches_done")
        if worker.role == "encoder" and isinstance(done, int):
            worker.outstanding_batches = max(0, worker.batches_sent - done)
            worker.num_active = worker.outstanding_batches

    def on_decode_tokens(self, worker: WorkerInfo, msg: P.DecodeTokens) -> None:
        now = time.time()
        for update in msg.updates:
            if not self.co.on_tokens(update, now) and not update.finished:
                self.send(worker, P.Cancel(req_id=update.req_id, reason="unknown request"))

    def on_worker_error(self, worker: WorkerInfo, msg: P.Error) -> None:
        if msg.code == "worker_lost" and msg.req_id is None:  # its goodbye: failing, exiting
            self.lose(worker, f"failed: {msg.message}")
            return
        self.limited.warning("worker_error", worker=worker.worker_id, code=msg.code,
                         req_id=msg.req_id, error=msg.message)
        request = self.co.table.get_wire(msg.req_id) if msg.req_id else None
        if request is None:
            return
        # only a worker of the current run may fail it (not one a re-run has left behind)
        if worker.role == PIPELINE_ROLE or worker.worker_id in (request.encoder,
                                                                request.decoder):
            self.co.fail(request, error_from_code(msg.code, f"{worker.worker_id}: "
                                                  f"{msg.message}", req_id=request.req_id))

    # ---- liveness -------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        self._beat_seq += 1
        self.limited.flush()
        beat = self._heartbeat(now)
        for worker in self.registry:
            self.send(worker, beat)
        for worker in self.registry.silent(now, self.cfg.heartbeat_timeout_s):
            self.lose(worker, f"silent for {now - worker.last_seen:.1f} s")

    def _process_exited(self, worker_id: str, pid: int) -> None:
        """A local worker's process ended (its pidfd): lost now, not at the deadline."""
        worker = self.registry.get(worker_id)
        if worker is not None and self._pids.get(worker_id) == pid:
            self.lose(worker, f"process {pid} exited")

    def lose(self, worker: WorkerInfo, why: str) -> None:
        """Drop a worker (and its TP group): re-run what it held elsewhere (or fail it when
        no worker of its role is left), re-route the rest. Triggers: the heartbeat deadline,
        the worker's goodbye (an ``Error("worker_lost")`` without a req_id), the exit of a
        local worker's process (coordinator/exitwatch.py), or a new session of the worker."""
        held: list[tuple[str, Request]] = []
        for member in self.registry.group_of(worker):
            self.registry.remove(member.worker_id)
            if why != "re-registered":
                self.exits.forget(member.worker_id)
            if why != "re-registered":
                self._lost_routes[member.routing_id] = None
                while len(self._lost_routes) > MAX_LOST_ROUTES:
                    self._lost_routes.popitem(last=False)
            self.log.error("worker_lost", worker=member.worker_id, worker_role=member.role,
                           why=why)
            write_status(self.cfg.ready_fd, "lost", worker=member.worker_id, why=why)
            held += [(member.worker_id, r) for r in self.co.table.held_by(member.worker_id)]
        for lost_id, request in held:  # after the whole group is gone: who is left to re-run
            self.co.rerun_or_fail(request, lost_id, worker.role, why)
        if worker.role == "decoder":
            self._update_encoders()
        if worker.role == PIPELINE_ROLE and self.co.pipeline is not None:
            self.co.pipeline.on_stage_lost(worker.worker_id, why)
        self._replan("loss", worker)

    def _replan(self, kind: str, worker: WorkerInfo) -> None:
        """A loss/join while serving: re-plan for the workers that remain (replan_live)."""
        replanner = getattr(self.co, "replanner", None)
        if kind == "join" and getattr(self.co.pipeline, "switching", None):
            return  # a live re-layout's stages re-Ready: not a new worker
        if self.serving and replanner is not None:
            replanner.changed(kind, worker.worker_id, worker.role)
