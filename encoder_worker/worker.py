"""The encoder worker's compute loop: take an EncodeBatch, encode, hand each request's KV
directly to the decoder the coordinator chose for it.

    inbox --EncodeBatch--> backend.encode(batch) --KVHandoff--> decoder (its KV endpoint)
                                                 --Heartbeat(load.batches_done)--> coordinator

The coordinator learns a batch is done from ``load["batches_done"]`` (a monotonic count, so a
late report never undercounts); requests cancelled while their batch waited are skipped.
"""

from __future__ import annotations

import queue
import time
from typing import Any

from common import protocol as P
from common.backend import EncodeBackend, Encoded, EncodeItem, NullEncodeBackend, NullShape
from common.busyclock import BusyClock
from common.models.config import ModelConfig
from common.workerconfig import WorkerConfig
from common.workerlink import Rejoin, Stop, WorkerLink
from common.workermain import FollowerLoop, check_same_model

MAX_CANCELLED = 65536
IDLE_TICK_S = 1.0  # the backend's idle() runs this often while no batch comes


def build_backend(cfg: WorkerConfig, assign: P.Assign) -> tuple[EncodeBackend, NullShape]:
    if cfg.backend == "engine":
        from common.backend_engine import EngineEncodeBackend, load_spec
        from common.weightstore import host_weights, spec_from_host

        assert cfg.model is not None
        spec = load_spec(cfg.model) if not host_weights(cfg, assign) else \
            spec_from_host(cfg.model)[0]
        check_same_model(spec.config, assign)
        shape = NullShape(spec.config, tp_rank=cfg.tp_rank, tp_size=cfg.tp_size)
        if cfg.tp_size == 1:
            return EngineEncodeBackend(spec, cfg.dtype, cfg.device), shape
        from common.backend_engine_tp import TPEncodeBackend, init_tp_group

        assert cfg.tp_init is not None
        tp = init_tp_group(cfg.tp_init, cfg.tp_rank, cfg.tp_size, cfg.heartbeat_timeout_s * 4)
        return TPEncodeBackend(spec, tp, cfg.dtype, cfg.device), shape
    model = ModelConfig.from_dict(assign.config["model"])
    shape = NullShape(model, tp_rank=cfg.tp_rank, tp_size=cfg.tp_size)
    return NullEncodeBackend(shape, cfg.encode_cost_ms, cfg.encode_cost_ms_per_token), shape


def make_loop(cfg: WorkerConfig, link: WorkerLink, assign: P.Assign,
              log: Any) -> EncoderLoop | FollowerLoop:
    """The encoder role's backend and loop (at startup, or after a live role switch)."""
    backend, shape = build_backend(cfg, assign)
    if cfg.tp_rank > 0 and cfg.backend == "engine":
        return FollowerLoop(backend)  # rank 0 of its TP group carries the data
    return EncoderLoop(cfg, link, backend, shape, log)


class EncoderLoop:
    """One compute loop; everything it sends goes through the link's I/O thread."""

    def __init__(self, cfg: WorkerConfig, link: WorkerLink, backend: EncodeBackend,
                 shape: NullShape, log: Any) -> None:
        self.cfg, self.link, self.backend, self.shape, self.log = cfg, link, backend, shape, log
        self.batches_done = 0
        self.requests_done = 0
        self.kv_bytes_sent = 0  # KV payload bytes handed to decoders (`exegpt stats`)
        self.cancelled: dict[str, None] = {}  # insertion-ordered, bounded by MAX_CANCELLED
        self.switch_to: P.Assign | None = None  # a live role switch (common.roleswitch)
        self.busy = BusyClock()
        link.load = self.load

    def load(self) -> dict[str, Any]:
        return {"batches_done": self.batches_done, "requests_done": self.requests_done,
                "kv_bytes_sent": self.kv_bytes_sent, **self.busy.load(),
                "queued_messages": self.link.inbox.qsize()}

    def run(self) -> int:
        """Returns the process exit code (0: told to stop; 1: lost the coordinator)."""
        try:
            return self._run()
        finally:
            self.backend.close()

    def _run(self) -> int:
        while True:
            try:
                msg = self.link.inbox.get(timeout=IDLE_TICK_S)
            except queue.Empty:
                self.backend.idle()
                continue
            if isinstance(msg, Stop):
                self.log.error("stopping", reason=msg.reason) if msg.error else None
                return 1 if msg.error else 0
            if isinstance(msg, P.Shutdown):
                self.log.info("shutdown", reason=msg.reason)
                return 0
            if isinstance(msg, P.Cancel):
                self.cancel(msg.req_id)
            elif isinstance(msg, P.EncodeBatch):
                self.encode_batch(msg)
            elif isinstance(msg, P.Assign):  # a role switch: the coordinator drained us
                self.switch_to = msg
                return 0
            elif isinstance(msg, Rejoin):  # a new coordinator counts our batches from 0
                self.log.warning("rejoining", reason=msg.reason)
                self.batches_done = 0
                self.cancelled.clear()
            else:
                self.link.limited.warning("unexpected_message", type=type(msg).__name__)

    def cancel(self, req_id: str) -> None:
        """Remember a cancel for a request that may still come in a batch (or already went:
        then the entry just ages out)."""
        self.cancelled[req_id] = None
        if len(self.cancelled) > MAX_CANCELLED:
            del self.cancelled[next(iter(self.cancelled))]

    def encode_batch(self, batch: P.EncodeBatch) -> None:
        todo = [r for r in batch.requests if r.req_id not in self.cancelled]
        for r in batch.requests:
            self.cancelled.pop(r.req_id, None)
        t_start = time.time()
        try:
            items = [EncodeItem(r.req_id, r.prompt_ids, r.max_new_tokens, r.sampling,
                                r.output_offset) for r in todo]
            with self.busy.timing():
                encoded = self.backend.encode(items)
        except Exception as exc:  # noqa: BLE001 - a failed batch fails its requests, not us
            self.log.exception("encode_failed", batch_id=batch.batch_id)
            if self.cfg.tp_size > 1:  # the group's ranks may be out of lockstep (a dead peer):
                raise  # fail the worker (its goodbye drops the group; the batch is re-run)
            for r in todo:
                self.link.send(P.Error(code="internal", req_id=r.req_id,
                                       message=f"encode failed on {self.cfg.worker_id}: {exc}"))
            encoded = []
        t_end = time.time()
        for request, out in zip(todo, encoded, strict=False):
            self.hand_off(request, out, t_start, t_end)
        self.batches_done += 1
        self.requests_done += len(todo)
        self.log.debug("encoded", batch_id=batch.batch_id, size=len(todo),
                       seconds=round(t_end - t_start, 6))
        self.link.send(P.Heartbeat(worker_id=self.cfg.worker_id, seq=self.batches_done,
                                   t_sent=time.time(), load=self.load()))

    def hand_off(self, request: P.EncodeRequest, out: Encoded, t_start: float,
                 t_end: float) -> None:
        first, last = out.head_range or self.shape.head_range()
        layers = out.layer_range or (0, self.shape.model.num_layers)
        kv = P.KVPayload(req_id=out.req_id, seq_len=out.seq_len, layer_start=layers[0],
                         layer_end=layers[1], head_start=first, head_end=last,
                         num_kv_heads=self.shape.model.kv_heads, tensors=out.kv)
        lifecycle = request.lifecycle.with_(t_encode_start=t_start, t_encode_end=t_end,
                                            t_kv_sent=time.time())
        handoff = P.KVHandoff(req_id=out.req_id, encoder_id=self.cfg.worker_id,
                              first_token=out.first_token, prompt_len=len(request.prompt_ids),
                              max_new_tokens=request.max_new_tokens, sampling=request.sampling,
                              kv=kv, lifecycle=lifecycle, output_offset=request.output_offset)
        assert request.decoder_id is not None
        self.link.send(handoff, decoder_id=request.decoder_id)
        self.kv_bytes_sent += sum(int(t.nbytes) for t in kv.tensors.values())
