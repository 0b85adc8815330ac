"""Data-plane messages (type bytes 0x2_): encode batches, KV handoffs, decoded tokens and
pipeline passes. Import them from common.protocol."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from common.protocol_codec import Message, Struct, Tensor, register
from common.protocol_values import (
    FINISH_REASONS,
    Lifecycle,
    Sampling,
    _check_id,
    _check_tokens,
)


@dataclass(frozen=True)
class EncodeRequest(Struct):
    """One request inside an EncodeBatch; decoder_id = who receives its KV (WAA)."""

    req_id: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    decoder_id: str | None = None
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    # a re-run after a worker loss: prompt_ids ends with the output_offset tokens the client
    # already has, and the first token of this run is output position output_offset
    output_offset: int = 0

    def check(self) -> None:
        _check_id("req_id", self.req_id)
        _check_tokens("prompt_ids", self.prompt_ids)
        if not 0 <= self.output_offset < len(self.prompt_ids):
            raise ValueError(f"output_offset {self.output_offset} must be in 0..len(prompt_ids)")


@register
@dataclass(frozen=True)
class EncodeBatch(Message):
    """Coordinator -> encoder worker: encode these requests, send KV to their decoders."""

    TYPE: ClassVar[int] = 0x20
    batch_id: int
    requests: tuple[EncodeRequest, ...]


@dataclass(frozen=True)
class KVPayload(Struct):
    """The wire form of the engine's KVExport (docs/interfaces.md): tensors are
    `[num_layers, num_heads_in_range, seq_len, head_dim]`, keys "k", "v" (+ "cross_k",
    "cross_v" for T5)."""

    req_id: str
    seq_len: int
    layer_start: int
    layer_end: int
    head_start: int
    head_end: int
    num_kv_heads: int
    tensors: dict[str, Tensor] = field(default_factory=dict)

    def check(self) -> None:
        if self.seq_len < 0 or not 0 <= self.layer_start <= self.layer_end:
            raise ValueError("need seq_len >= 0 and 0 <= layer_start <= layer_end")
        if not 0 <= self.head_start <= self.head_end <= self.num_kv_heads:
            raise ValueError("need 0 <= head_start <= head_end <= num_kv_heads")

    @classmethod
    def from_export(cls, export: object) -> KVPayload:
        """From any object with KVExport's attributes (the engine's class)."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{n: getattr(export, n) for n in names})


@register
@dataclass(frozen=True)
class KVHandoff(Message):
    """Encoder -> decoder: one request's KV, its first generated token and its metadata."""

    TYPE: ClassVar[int] = 0x21
    req_id: str
    encoder_id: str
    first_token: int
    prompt_len: int
    max_new_tokens: int
    sampling: Sampling
    kv: KVPayload
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    # a re-run's EncodeRequest.output_offset: first_token is output position output_offset,
    # so the decoder's seeded draws continue at output_offset + 1 (docs/mesh.md, "Worker loss")
    output_offset: int = 0

    def check(self) -> None:
        if self.output_offset < 0:
            raise ValueError(f"output_offset must be >= 0, got {self.output_offset}")
        if self.kv.req_id != self.req_id:
            raise ValueError(f"kv.req_id {self.kv.req_id!r} != req_id {self.req_id!r}")


@dataclass(frozen=True)
class TokenUpdate(Struct):
    """New tokens for one request from one decode step (lifecycle on first/last update)."""

    req_id: str
    tokens: tuple[int, ...]
    finished: bool = False
    finish_reason: str | None = None
    lifecycle: Lifecycle | None = None

    def check(self) -> None:
        if self.finished and self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"a finished update needs finish_reason in {FINISH_REASONS}")


@register
@dataclass(frozen=True)
class DecodeTokens(Message):
    """Decoder -> coordinator: the tokens of one decode step for many requests."""

    TYPE: ClassVar[int] = 0x22
    worker_id: str
    step: int
    t_emitted: float
    updates: tuple[TokenUpdate, ...]


# ---------------------------------------------------------------- pipeline plans (0x23-0x24)
PASS_KINDS = ("encode", "decode")


@register
@dataclass(frozen=True)
class StagePass(Message):
    """One pass of one stream through a pipeline of stage workers (RRA, static, continuous).

    Coordinator -> stage 0 without ``hidden``; stage s -> stage s+1 (direct, to the next
    stage's ``kv_endpoint``) with ``hidden`` = stage s's output rows, packed as the engine's
    StageBatch (``sum(seq_lens)`` rows for encode, one row per sequence for decode). Every stage
    first frees ``free`` (finished or cancelled requests), then runs the pass over ``req_ids``
    in that order. Encode: ``requests`` holds the prompts (same order as ``req_ids``), and
    ``tokens`` is empty. Decode: ``tokens`` holds each sequence's last token and ``requests``
    is empty. ``kind == "decode"`` with no ``req_ids`` only frees.

    T5 over several stages encodes in two laps: ``lap`` 0 runs the encoder layers stage 0 ->
    P-1; the last stage sends the pass back to stage 0 (its peer "first") as ``lap`` 1 with
    ``encoder_out`` = the final encoder output (``sum(seq_lens)`` rows); lap 1 writes each
    stage's cross K/V and runs the decoder start token (``hidden``: one row per sequence);
    ``encoder_out`` travels on only while a later stage still needs it.
    """

    TYPE: ClassVar[int] = 0x23
    pass_id: int
    stream: int
    kind: str
    req_ids: tuple[str, ...]
    tokens: tuple[int, ...] = ()
    requests: tuple[EncodeRequest, ...] = ()
    free: tuple[str, ...] = ()
    hidden: Tensor | None = None
    stage_times: tuple[float, ...] = ()  # seconds each earlier stage computed this pass
    lap: int = 0  # T5 encode over several stages: 0 encoder layers, 1 cross K/V + start token
    encoder_out: Tensor | None = None  # lap 1: the final encoder output rows

    def check(self) -> None:
        if self.kind not in PASS_KINDS:
            raise ValueError(f"kind must be one of {PASS_KINDS}, got {self.kind!r}")
        if self.pass_id < 0 or self.stream < 0:
            raise ValueError("pass_id and stream must be >= 0")
        if self.lap not in (0, 1) or (self.lap == 1 and self.kind != "encode"):
            raise ValueError(f"lap must be 0, or 1 on an encode pass; got lap {self.lap} on "
                             f"a {self.kind} pass")
        if self.kind == "encode" and tuple(r.req_id for r in self.requests) != self.req_ids:
            raise ValueError("an encode pass needs requests in the order of req_ids")
        if self.kind == "decode" and len(self.tokens) != len(self.req_ids):
            raise ValueError(f"a decode pass needs one token per request: "
                             f"{len(self.tokens)} tokens for {len(self.req_ids)} requests")


@register
@dataclass(frozen=True)
class PassDone(Message):
    """Last pipeline stage -> coordinator: the pass's new token for each sequence, in the
    pass's order (``finished`` ones are freed by the last stage at once; the coordinator puts
    them in the stream's next ``free`` so the other stages free them too). ``error`` set: the
    pass failed on ``worker_id`` and no tokens came out (every stage dropped its requests)."""

    TYPE: ClassVar[int] = 0x24
    worker_id: str
    pass_id: int
    stream: int
    kind: str
    updates: tuple[TokenUpdate, ...] = ()
    stage_times: tuple[float, ...] = ()  # seconds each stage computed, stage 0 first
    error: str | None = None

    def check(self) -> None:
        if self.kind not in PASS_KINDS:
            raise ValueError(f"kind must be one of {PASS_KINDS}, got {self.kind!r}")
