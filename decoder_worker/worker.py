"""The decoder worker's compute loop: merge arriving KV into the running batch, run decode
iterations, stream each iteration's tokens to the coordinator.

    loop:
        take_messages()    KVHandoff -> join the batch (its first token goes out at once),
                           Cancel -> leave the batch, Shutdown/Stop -> finish
        step()             one decode iteration over every running sequence
        publish()          one DecodeTokens for the iteration (first tokens + new tokens)

When nothing is running the loop blocks on the inbox, so an idle decoder costs no CPU.
"""

from __future__ import annotations

import queue
import time
from typing import Any

from common import protocol as P
from common.backend import DecodeBackend, DecodeSeq, NullDecodeBackend, NullShape
from common.busyclock import BusyClock
from common.models.config import ModelConfig
from common.workerconfig import WorkerConfig
from common.workerlink import Rejoin, Stop, WorkerLink
from common.workermain import FollowerLoop, check_same_model, stop_code


def build_backend(cfg: WorkerConfig, assign: P.Assign) -> DecodeBackend:
    if cfg.backend == "engine":
        from common.backend_engine import EngineDecodeBackend, load_spec
        from common.weightstore import host_weights, spec_from_host

        assert cfg.model is not None
        spec = load_spec(cfg.model) if not host_weights(cfg, assign) else \
            spec_from_host(cfg.model)[0]
        check_same_model(spec.config, assign)
        if cfg.tp_size == 1:
            return EngineDecodeBackend(spec, cfg.dtype, cfg.device)
        from common.backend_engine_tp import init_tp_group
        from common.backend_engine_tpdec import TPDecodeBackend

        assert cfg.tp_init is not None
        tp = init_tp_group(cfg.tp_init, cfg.tp_rank, cfg.tp_size, cfg.heartbeat_timeout_s * 4)
        return TPDecodeBackend(spec, tp, cfg.dtype, cfg.device)
    model = ModelConfig.from_dict(assign.config["model"])
    shape = NullShape(model, tp_rank=cfg.tp_rank, tp_size=cfg.tp_size)
    return NullDecodeBackend(shape, cfg.decode_cost_ms)


def make_loop(cfg: WorkerConfig, link: WorkerLink, assign: P.Assign,
              log: Any) -> DecoderLoop | FollowerLoop:
    """The decoder role's backend and loop (at startup, or after a live role switch)."""
    backend = build_backend(cfg, assign)
    if cfg.tp_rank > 0 and cfg.backend == "engine":
        return FollowerLoop(backend)
    return DecoderLoop(cfg, link, backend, log)


class DecoderLoop:
    """Owns the running batch; talks to the world only through the link."""

    def __init__(self, cfg: WorkerConfig, link: WorkerLink, backend: DecodeBackend,
                 log: Any) -> None:
        self.cfg, self.link, self.backend, self.log = cfg, link, backend, log
        self.steps = 0
        self.seq_steps = 0  # sequences summed over steps: steps' mean batch (`exegpt stats`)
        self.tokens_out = 0
        self.updates_out = 0
        self.kv_bytes_received = 0  # KV payload bytes taken from encoders (`exegpt stats`)
        self._last_publish = 0.0
        self.exit_code: int | None = None
        self._pending: dict[str, P.TokenUpdate] = {}  # first tokens not yet published
        self._held: dict[str, list[int]] = {}  # tokens waiting for the interval / congestion
        self._live: set[str] = set()  # sequences in the backend (dropped on a Rejoin)
        self.switch_to: P.Assign | None = None  # a live role switch (common.roleswitch)
        self.busy = BusyClock()
        link.load = self.load

    def load(self) -> dict[str, Any]:
        return {"active": self.backend.num_active, "steps": self.steps,
                "tokens_out": self.tokens_out, "updates_out": self.updates_out,
                "kv_bytes_received": self.kv_bytes_received, "seq_steps": self.seq_steps,
                **self.busy.load(), "queued_messages": self.link.inbox.qsize()}

    def run(self) -> int:
        try:
            return self._run()
        finally:
            self.backend.close()

    def _run(self) -> int:
        while self.exit_code is None:
            self.take_messages(block=self.backend.num_active == 0 and not self._pending)
            if self.exit_code is not None:
                break
            updates = self.step()
            self.publish(updates)
        return self.exit_code

    def take_messages(self, block: bool) -> None:
        try:
            msg = self.link.inbox.get(timeout=1.0) if block else self.link.inbox.get_nowait()
        except queue.Empty:
            if block:
                self.backend.idle()  # a TP group's keep-alive
            return
        while True:
            self.handle(msg)
            if self.exit_code is not None:
                return
            try:
                msg = self.link.inbox.get_nowait()
            except queue.Empty:
                return

    def handle(self, msg: P.Message | Stop) -> None:
        if isinstance(msg, P.KVHandoff):
            self.admit(msg)
        elif isinstance(msg, P.Cancel):
            self.drop(msg.req_id)
        elif isinstance(msg, Rejoin):  # the coordinator restarted: it knows none of these
            self.log.warning("dropping_all", reason=msg.reason, sequences=len(self._live))
            for req_id in list(self._live) + list(self._pending):
                self.drop(req_id)
        elif isinstance(msg, P.Assign):  # a role switch: the coordinator migrated the rest
            self.log.info("role_switch_drop", sequences=len(self._live))
            for req_id in list(self._live) + list(self._pending):
                self.drop(req_id)
            self.switch_to, self.exit_code = msg, 0
        elif (code := stop_code(msg, self.log)) is not None:
            self.exit_code = code
        else:
            self.link.limited.warning("unexpected_message", type=type(msg).__name__)

    def drop(self, req_id: str) -> None:
        """Free a sequence's KV and forget its unpublished tokens."""
        self.backend.remove(req_id)
        self._live.discard(req_id)
        self._pending.pop(req_id, None)
        self._held.pop(req_id, None)

    def admit(self, handoff: P.KVHandoff) -> None:
        """Join the batch; the encode pass's token is this request's first output token."""
        lifecycle = handoff.lifecycle.with_(t_kv_received=time.time())
        self.kv_bytes_received += sum(int(t.nbytes) for t in handoff.kv.tensors.values())
        self.log.debug("kv_received", req_id=handoff.req_id, encoder=handoff.encoder_id,
                       seq_len=handoff.kv.seq_len)
        seq = DecodeSeq(req_id=handoff.req_id, prompt_len=handoff.prompt_len,
                        first_token=handoff.first_token, max_new_tokens=handoff.max_new_tokens,
                        kv=dict(handoff.kv.tensors),
                        head_range=(handoff.kv.head_start, handoff.kv.head_end),
                        layer_range=(handoff.kv.layer_start, handoff.kv.layer_end),
                        sampling=handoff.sampling, output_offset=handoff.output_offset)
        try:
            reason = self.backend.first_reason(seq)
            if reason is None:
                self.backend.add(seq)
                self._live.add(seq.req_id)
        except ValueError as exc:
            self.link.limited.error("bad_handoff", req_id=handoff.req_id, error=str(exc))
            self.link.send(P.Error(code="internal", req_id=handoff.req_id, message=str(exc)))
            return
        self._pending[handoff.req_id] = P.TokenUpdate(
            req_id=handoff.req_id, tokens=(handoff.first_token,), finished=reason is not None,
            finish_reason=reason, lifecycle=lifecycle)

    def step(self) -> list[P.TokenUpdate]:
        """One decode iteration. A new sequence's first token goes out at once (TTFT); later
        tokens every ``stream_interval`` iterations, and always with the last one."""
        first, self._pending = self._pending, {}
        out = []
        if self.backend.num_active:
            with self.busy.timing():
                out = self.backend.step()
        if out:
            self.steps += 1
            self.seq_steps += len(out)
        # While the coordinator reads slower than we decode, tokens wait here and leave as one
        # update per sequence (fewer, larger messages) instead of queueing message by message.
        # Steps faster than publish_interval_ms (the null model, tiny models) are merged too:
        # a token waits at most that long, and a real model's step is longer anyway.
        now = time.monotonic()
        due = (self.steps % self.cfg.stream_interval == 0 and not self.link.congested
               and now - self._last_publish >= self.cfg.publish_interval_ms / 1000)
        if due:
            self._last_publish = now
        updates = []
        for tok in out:
            if tok.finished:
                self._live.discard(tok.req_id)
            head = first.pop(tok.req_id, None)
            held = self._held.get(tok.req_id)
            if head is None and not tok.finished and not due:
                if held is None:
                    self._held[tok.req_id] = [tok.token]
                else:
                    held.append(tok.token)
                continue
            tokens = (head.tokens if head else ()) + tuple(self._held.pop(tok.req_id, ()))
            updates.append(P.TokenUpdate(
                req_id=tok.req_id, tokens=tokens + (tok.token,), finished=tok.finished,
                finish_reason=tok.reason or ("length" if tok.finished else None),
                lifecycle=head.lifecycle if head else None))
        updates.extend(first.values())
        return updates

    def publish(self, updates: list[P.TokenUpdate]) -> None:
        if not updates:
            return
        self.tokens_out += sum(len(u.tokens) for u in updates)
        self.updates_out += len(updates)
        self.link.send(P.DecodeTokens(worker_id=self.cfg.worker_id, step=self.steps,
                                      t_emitted=time.time(), updates=tuple(updates)))
