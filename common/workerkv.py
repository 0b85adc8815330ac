"""A worker's KV endpoint paths, on the link's I/O thread (a mixin of WorkerLink).

    decoder / stage: ROUTER at ``kv_endpoint`` <-- encoders' (previous stage's) DEALERs
    encoder / stage: one DEALER per peer (``Assign.peers``: decoder id or "next" -> endpoint)

Inbound: KVHandoffs (StagePasses on a stage) go to the compute loop's inbox; anything else is
answered with an ``Error`` (rate-limited warning); while the link re-registers with a restarted
coordinator everything is dropped. Outbound: a send that has no route or times out
(``KV_SEND_TIMEOUT_MS``: the peer stopped reading) is reported to the coordinator (an Error for
the request, or ``PassDone(error)`` for a stage pass); ``EXEGPT_FAULTS`` may drop or delay a
handoff first (common/faults.py). With ``--curve-mesh-key`` both ends speak CURVE with the
mesh key pair (common/meshcurve.py); a peer without it is refused at the handshake.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import time
from typing import Any

import zmq

from common import protocol as P
from common.errors import ProtocolError
from common.faults import KVFaults
from common.logbudget import LogLimiter
from common.meshcurve import kv_client_keys, kv_server_options
from common.sockets import bound_endpoint, make_socket
from common.workerconfig import WorkerConfig

KV_SEND_TIMEOUT_MS = 2000


class KVPaths:
    """The KV half of WorkerLink; it owns the sockets and state these methods use."""

    cfg: WorkerConfig
    log: Any
    limited: LogLimiter
    inbox: queue.Queue[Any]
    kv_endpoint: str | None
    dropped: int
    _ctx: zmq.Context
    _peers: dict[str, str]
    _kv_in: zmq.Socket | None
    _kv_out: dict[str, zmq.Socket]
    _faults: KVFaults
    _rejoining_since: float | None

    def _to_coordinator(self, frames: list[Any]) -> None:
        raise NotImplementedError

    def _bind_kv(self) -> zmq.Socket:
        assert self.cfg.kv_bind is not None
        sock = make_socket(self._ctx, "ROUTER", bind=self.cfg.kv_bind,
                           **kv_server_options(self._ctx, self.cfg.curve_mesh_key, self.log))
        self.kv_endpoint = advertised(bound_endpoint(sock), self.cfg.kv_advertise)
        return sock

    def _kv_socket(self, decoder_id: str) -> zmq.Socket | None:
        sock = self._kv_out.get(decoder_id)
        endpoint = self._peers.get(decoder_id)
        if sock is None and endpoint is not None:
            sock = make_socket(self._ctx, "DEALER", connect=endpoint,
                               identity=self.cfg.worker_id, sndtimeo_ms=KV_SEND_TIMEOUT_MS,
                               curve_client=kv_client_keys(self.cfg.curve_mesh_key))
            self._kv_out[decoder_id] = sock
        return sock

    def _send_kv(self, decoder_id: str, frames: list[Any], injected: bool = False) -> None:
        if not injected and self.cfg.role == "encoder" and self._inject(decoder_id, frames):
            return
        sock = self._kv_socket(decoder_id)
        if sock is None:
            self._report_no_route(decoder_id, "has no KV endpoint for", frames)
            return
        try:
            sock.send_multipart(frames, copy=False)
        except zmq.Again:  # the decoder stopped reading for KV_SEND_TIMEOUT_MS
            self._report_no_route(decoder_id, "timed out sending KV to", frames)

    def _inject(self, decoder_id: str, frames: list[Any]) -> bool:
        """EXEGPT_FAULTS: True when this KV handoff is dropped or held back."""
        fate = self._faults.fate()
        if fate is None:
            return False
        self.limited.warning("fault_injected", fault="kv_drop" if fate == "drop" else
                             "kv_delay", decoder=decoder_id, req_id=P.peek_req_id(frames))
        if fate != "drop":
            assert isinstance(fate, float)
            self._faults.hold(time.monotonic() + fate, decoder_id, frames)
        return True

    def _report_no_route(self, decoder_id: str, what: str, frames: list[Any]) -> None:
        if self.cfg.role == "pipeline" and frames[0].bytes[:1] == bytes([P.StagePass.TYPE]):
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
            if self._rejoining_since is not None:
                self.dropped += 1  # KV / passes of the lost coordinator's run
                continue
            try:
                msg = P.decode(frames)
                # a staged WAA decoder stage takes both (KV from encoder stages)
                want = (P.StagePass, P.KVHandoff) if self.cfg.role == "pipeline" else (
                    P.KVHandoff,)
                if not isinstance(msg, want):
                    raise ProtocolError(f"the KV endpoint takes "
                                        f"{'/'.join(w.__name__ for w in want)}, got "
                                        f"{type(msg).__name__}")
            except ProtocolError as exc:
                self.limited.warning("bad_kv_message", error=str(exc))
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

