"""The math behind a pipeline stage worker (RRA, static, continuous plans): one StagePass in,
hidden rows (stages before the last) or each sequence's new token (the last stage) out.

Every stage runs the same template for every pass, so all stages of a pipeline agree on which
requests exist and what each one has generated:

    run(pass)
      drop(pass.free)                       finished / cancelled requests leave (KV freed)
      check(pass)                           bad input -> ValueError, nothing computed
      encode: admit(requests)               every stage knows each request's prompt length
      compute(pass, hidden)                 the backend's math (engine, TP group, null model)
      last stage: emit(tokens)              count, decide finish (EOS, stop token,
                                            max_new_tokens, context), free finished at once
      a ValueError anywhere: drop the pass's requests, then re-raise (the worker reports it)

``NullStageBackend`` (this module, numpy only, no torch import) does no math: it passes
real-sized bf16 hidden rows and emits the null model's tokens (``common.backend.null_token``);
``common.backend_stage_engine.EngineStageBackend`` runs a real model's layer range, and
``common.backend_stage_tp.TPStageBackend`` a tensor-parallel group of such stages.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common import protocol as P
from common.backend import KV_DTYPE, StepToken, null_token
from common.models.config import ModelConfig
from common.tensorframe import WireTensor


@dataclass
class StageSeq:
    """One request as a stage sees it (``num_generated`` counts on the last stage only)."""

    req_id: str
    stream: int
    prompt: tuple[int, ...]
    max_new_tokens: int
    sampling: P.Sampling
    num_generated: int = 0


@dataclass
class PassOutput:
    """A stage's result: ``hidden`` for the next stage, or (last stage) one token each.
    T5 over several stages (``common.backend_stage_engine``): ``encoder_out`` travels with a
    lap-1 pass; ``lap_back`` = the last stage ends lap 0 and sends ``encoder_out`` to stage 0."""

    hidden: Any = None
    tokens: list[StepToken] = field(default_factory=list)
    encoder_out: Any = None
    lap_back: bool = False


class StageBackendBase:
    """The per-pass template of the module docstring; subclasses supply ``_compute`` and
    ``_release`` (and, on the last stage, ``_finish``)."""

    def __init__(self, model: ModelConfig, is_first: bool, is_last: bool) -> None:
        self.model = model
        self.is_first, self.is_last = is_first, is_last
        self.seqs: dict[str, StageSeq] = {}
        self.stage_index: int | None = None  # the worker sets it from its Assign

    @property
    def num_active(self) -> int:
        return len(self.seqs)

    def idle(self) -> None:
        """Called about once a second while no pass comes (a TP group's keep-alive)."""

    def close(self) -> None:
        """The worker is stopping."""

    def run(self, sp: P.StagePass) -> PassOutput:
        self.drop(sp.free)
        try:
            self.check(sp)
            if not sp.req_ids:
                return PassOutput(hidden=None if self.is_last else self._empty_hidden())
            if sp.kind == "encode" and sp.lap == 0:
                self._admit(sp.requests, sp.stream)
            out = self._compute(sp)
        except ValueError:
            self.drop(sp.req_ids)
            raise
        if isinstance(out, PassOutput):  # a T5 encode lap that hands on more than rows
            return out
        if not self.is_last:
            return PassOutput(hidden=out)
        return PassOutput(tokens=self._emit(sp.req_ids, out))

    def drop(self, req_ids: Iterable[str]) -> None:
        """Free these requests here (unknown ids are ignored: a free may arrive twice)."""
        gone = [r for r in req_ids if self.seqs.pop(r, None) is not None]
        if gone:
            self._release(gone)

    # ---- validation ---------------------------------------------------------------------
    def check(self, sp: P.StagePass) -> None:
        """Reject what would fail (or silently misbehave) inside the math, before any of it
        runs; every stage checks the same facts, so the first stage catches bad requests."""
        if len(set(sp.req_ids)) != len(sp.req_ids):
            raise ValueError(f"pass {sp.pass_id}: a request appears twice in req_ids")
        if sp.kind == "encode" and sp.lap == 0:
            for req in sp.requests:
                self._check_request(req)
            rows = sum(len(req.prompt_ids) for req in sp.requests)
        else:  # a decode, or lap 1 of a T5 encode (the start token of admitted requests)
            unknown = [r for r in sp.req_ids if r not in self.seqs]
            if unknown:
                raise ValueError(f"pass {sp.pass_id}: requests {unknown[:5]} are not running "
                                 "on this stage (never encoded, or already freed)")
            moved = [r for r in sp.req_ids if self.seqs[r].stream != sp.stream]
            if moved:
                raise ValueError(f"pass {sp.pass_id} of stream {sp.stream}: requests "
                                 f"{moved[:5]} were encoded in another stream")
            if sp.kind == "decode":
                self._check_ids("decode tokens", sp.tokens)
            rows = len(sp.req_ids)
        if not self.is_first and sp.req_ids:
            self._check_hidden(sp, rows)

    def _check_request(self, req: P.EncodeRequest) -> None:
        if req.req_id in self.seqs:
            raise ValueError(f"request {req.req_id} is already running on this stage")
        if not req.prompt_ids:
            raise ValueError(f"request {req.req_id}: empty prompt")
        if req.max_new_tokens < 1:
            raise ValueError(f"request {req.req_id}: max_new_tokens must be >= 1")
        if len(req.prompt_ids) > self.model.max_position:
            raise ValueError(f"request {req.req_id}: prompt of {len(req.prompt_ids)} tokens "
                             f"exceeds the model's context of {self.model.max_position}")
        self._check_ids(f"request {req.req_id}", req.prompt_ids)
        req.sampling.check()

    def _check_ids(self, what: str, ids: Iterable[int]) -> None:
        bad = [t for t in ids if not 0 <= t < self.model.vocab_size]
        if bad:
            raise ValueError(f"{what}: token ids {bad[:5]} outside the vocabulary "
                             f"(size {self.model.vocab_size})")

    def _check_hidden(self, sp: P.StagePass, rows: int) -> None:
        want = (rows, self.model.hidden_size)
        if sp.hidden is None:
            raise ValueError(f"pass {sp.pass_id}: a stage after the first needs the previous "
                             "stage's hidden rows")
        if tuple(sp.hidden.shape) != want:
            raise ValueError(f"pass {sp.pass_id}: hidden rows of shape "
                             f"{tuple(sp.hidden.shape)}, expected {want}")

    # ---- bookkeeping --------------------------------------------------------------------
    def _admit(self, requests: Iterable[P.EncodeRequest], stream: int) -> None:
        for req in requests:
            self.seqs[req.req_id] = StageSeq(req.req_id, stream, tuple(req.prompt_ids),
                                             req.max_new_tokens, req.sampling)

    def _emit(self, req_ids: Iterable[str], tokens: list[int]) -> list[StepToken]:
        """Count each sequence's new token, decide which stop, free those at once."""
        out = []
        for r, token in zip(req_ids, tokens, strict=True):
            seq = self.seqs[r]
            position = seq.num_generated
            seq.num_generated += 1
            reason = self._finish(seq, int(token))
            out.append(StepToken(r, int(token), position, reason is not None, reason))
        self.drop([t.req_id for t in out if t.finished])
        return out

    # ---- what a backend supplies --------------------------------------------------------
    def _compute(self, sp: P.StagePass) -> Any:
        """Hidden rows for the next stage, or (last stage) one token id per request."""
        raise NotImplementedError

    def _release(self, req_ids: list[str]) -> None:
        """Free these requests' KV (they already left ``self.seqs``)."""

    def _finish(self, seq: StageSeq, token: int) -> str | None:
        """Why ``seq`` stops after ``token`` (its ``num_generated``-th), or None."""
        return "length" if seq.num_generated >= seq.max_new_tokens else None

    def _empty_hidden(self) -> Any:
        return _bf16_rows(0, self.model.hidden_size)


def _bf16_rows(rows: int, hidden_size: int, fill: int = 0) -> WireTensor:
    """bf16 ``[rows, hidden_size]`` as raw 2-byte words (numpy: no torch import)."""
    words = np.full((rows, hidden_size), fill, np.uint16).reshape(-1).view(np.uint8)
    return WireTensor.from_buffer(KV_DTYPE, (rows, hidden_size), words)


class NullStageBackend(StageBackendBase):
    """No math: real-sized hidden rows between stages, the null model's tokens at the end,
    a configurable sleep per pass standing in for device time."""

    def __init__(self, model: ModelConfig, is_first: bool, is_last: bool,
                 encode_cost_ms: float = 0.0, encode_cost_ms_per_token: float = 0.0,
                 decode_cost_ms: float = 0.0) -> None:
        super().__init__(model, is_first, is_last)
        if min(encode_cost_ms, encode_cost_ms_per_token, decode_cost_ms) < 0:
            raise ValueError("costs must be >= 0 ms")
        self.encode_cost_ms = encode_cost_ms
        self.encode_cost_ms_per_token = encode_cost_ms_per_token
        self.decode_cost_ms = decode_cost_ms
        self._token0: dict[str, int] = {}  # last stage: each request's output position 0

    def _release(self, req_ids: list[str]) -> None:
        for r in req_ids:
            self._token0.pop(r, None)

    def _compute(self, sp: P.StagePass) -> Any:
        if sp.kind == "encode":
            rows = sum(len(req.prompt_ids) for req in sp.requests)
            cost = self.encode_cost_ms + self.encode_cost_ms_per_token * rows
        else:
            rows, cost = len(sp.req_ids), self.decode_cost_ms
        if cost > 0:
            time.sleep(cost / 1000)  # like a GPU kernel, the wait leaves the CPU to I/O
        if not self.is_last:
            return _bf16_rows(rows, self.model.hidden_size, 0x3F80)  # bf16 1.0
        vocab = self.model.vocab_size
        if sp.kind == "encode":  # a long prompt is summed once, not at every pass
            self._token0.update((r.req_id, _null_token0(r, vocab)) for r in sp.requests)
        return [(self._token0[r] + self.seqs[r].num_generated * 1009) % vocab
                for r in sp.req_ids]


def _null_token0(req: P.EncodeRequest, vocab: int) -> int:
    """A re-encoded (migrated) request continues its sequence: the rule is a function of the
    original prompt (minus the ``output_offset`` output tokens appended) and the position."""
    original = req.prompt_ids[:len(req.prompt_ids) - req.output_offset]
    return null_token(original, req.output_offset, vocab)
