"""Every message that crosses a socket in exegpt, as typed frozen dataclasses.

Wire format (byte by byte in docs/wire.md): frame 0 = one type byte, frame 1 = msgpack map
with "v" = PROTOCOL_VERSION and one entry per field in declaration order, frames 2.. = raw
tensor bytes. `encode(msg)` / `decode(frames)` convert; decoding is strict and raises only
`ProtocolError`. No pickle anywhere.

Who sends what (-> direction):

    client      Submit, Cancel, StatsRequest            -> coordinator (DEALER -> ROUTER)
    coordinator StreamChunk, Result, Error, Stats       -> client
    worker      Hello, Ready, Heartbeat, DecodeTokens, Error, Stats -> coordinator
    coordinator Assign, EncodeBatch, Cancel, Heartbeat, StatsRequest, Shutdown -> worker
    encoder     KVHandoff                               -> decoder (directly, never via the
                                                           coordinator)

Startup handshake: worker Hello -> coordinator Assign -> worker Ready. Type bytes are grouped:
0x0_ control, 0x1_ client-facing, 0x2_ data plane. New message types get new bytes; a
change to an existing message's fields bumps PROTOCOL_VERSION.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from common.errors import ERROR_CODES, ProtocolError, ServerError
from common.protocol_codec import (
    DEFAULT_LIMITS,
    PROTOCOL_VERSION,
    Json,
    Limits,
    Message,
    Struct,
    Tensor,
    decode,
    encode,
    message_types,
    peek_req_id,
    register,
)

__all__ = [
    "PROTOCOL_VERSION", "DEFAULT_LIMITS", "Limits", "Message", "Struct", "Tensor", "Json",
    "ProtocolError", "encode", "decode", "message_types", "peek_req_id",
    "ROLES", "FINISH_REASONS", "Sampling", "Lifecycle", "Hello", "Assign", "Ready",
    "Heartbeat", "Shutdown", "Submit", "StreamChunk", "Result", "Cancel", "Error",
    "StatsRequest", "Stats", "EncodeRequest", "EncodeBatch", "KVPayload", "KVHandoff",
    "TokenUpdate", "DecodeTokens", "StagePass", "PassDone", "PASS_KINDS", "error_for",
]

ROLES = ("encoder", "decoder", "pipeline", "any")
"""Worker roles; "any" = a worker that takes whatever role the coordinator assigns."""
FINISH_REASONS = ("stop", "length", "cancelled", "timeout", "error")
MAX_ID_LEN = 256


def _check_id(name: str, value: str) -> None:
    if not value or len(value) > MAX_ID_LEN:
        raise ValueError(f"{name} must be a non-empty string of at most {MAX_ID_LEN} chars")


def _check_tokens(name: str, ids: tuple[int, ...]) -> None:
    if any(t < 0 for t in ids):
        raise ValueError(f"{name} must hold non-negative token ids")


def _check_range(name: str, rng: tuple[int, ...] | None) -> None:
    if rng is not None and (len(rng) != 2 or not 0 <= rng[0] <= rng[1]):
        raise ValueError(f"{name} must be (first, end) with 0 <= first <= end, got {rng!r}")


# ---------------------------------------------------------------- shared values


@dataclass(frozen=True)
class Sampling(Struct):
    """Sampling parameters as they travel; temperature 0 means greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # run to max_new_tokens (benchmarks force output lengths)

    def check(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_tokens("stop_token_ids", self.stop_token_ids)


@dataclass(frozen=True)
class Lifecycle(Struct):
    """A request's timestamps (time.time() seconds; None until reached): the one source for
    latency checks, simulator validation and traces."""

    t_arrival: float | None = None
    t_queued: float | None = None
    t_encode_start: float | None = None
    t_encode_end: float | None = None
    t_kv_sent: float | None = None
    t_kv_received: float | None = None
    t_first_token: float | None = None
    t_tokens: tuple[float, ...] = ()
    t_finish: float | None = None

    def with_(self, **changes: object) -> Lifecycle:
        return dataclasses.replace(self, **changes)

    def merged(self, other: Lifecycle) -> Lifecycle:
        """Fill our unset timestamps from `other` (e.g. a worker's report)."""
        changes = {
            f.name: getattr(other, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) in (None, ()) and getattr(other, f.name) not in (None, ())
        }
        return dataclasses.replace(self, **changes) if changes else self

    @property
    def ttft(self) -> float | None:
        """Time to first token, from arrival."""
        if self.t_arrival is None or self.t_first_token is None:
            return None
        return self.t_first_token - self.t_arrival

    @property
    def latency(self) -> float | None:
        if self.t_arrival is None or self.t_finish is None:
            return None
        return self.t_finish - self.t_arrival

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if len(self.t_tokens) < 2:
            return None
        return (self.t_tokens[-1] - self.t_tokens[0]) / (len(self.t_tokens) - 1)


# ---------------------------------------------------------------- control (0x0_)


@register
@dataclass(frozen=True)
class Hello(Message):
    """Worker -> coordinator, first message: who I am and what I can hold."""

    TYPE: ClassVar[int] = 0x01
    worker_id: str
    role: str
    tp_rank: int = 0
    tp_size: int = 1
    device: str = "cpu"
    pid: int = 0
    host: str = ""
    kv_endpoint: str | None = None
    capacity: Json = field(default_factory=dict)

    def check(self) -> None:
        _check_id("worker_id", self.worker_id)
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"need 0 <= tp_rank < tp_size, got {self.tp_rank}/{self.tp_size}")


@register
@dataclass(frozen=True)
class Assign(Message):
    """Coordinator -> worker: its role, layers and peers (config holds plan/backend data)."""

    TYPE: ClassVar[int] = 0x02
    worker_id: str
    role: str
    group: int = 0
    tp_rank: int = 0
    tp_size: int = 1
    layer_range: tuple[int, ...] | None = None
    encoder_layer_range: tuple[int, ...] | None = None
    peers: dict[str, str] = field(default_factory=dict)
    heartbeat_interval_s: float = 1.0
    config: Json = field(default_factory=dict)

    def check(self) -> None:
        _check_id("worker_id", self.worker_id)
        if self.role not in ROLES[:3]:
            raise ValueError(f"assigned role must be one of {ROLES[:3]}, got {self.role!r}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"need 0 <= tp_rank < tp_size, got {self.tp_rank}/{self.tp_size}")
        _check_range("layer_range", self.layer_range)
        _check_range("encoder_layer_range", self.encoder_layer_range)
        if not self.heartbeat_interval_s > 0:
            raise ValueError("heartbeat_interval_s must be > 0")


@register
@dataclass(frozen=True)
class Ready(Message):
    """Worker -> coordinator: assignment applied (weights loaded, KV socket bound)."""

    TYPE: ClassVar[int] = 0x03
    worker_id: str
    kv_endpoint: str | None = None
    info: Json = field(default_factory=dict)

    def check(self) -> None:
        _check_id("worker_id", self.worker_id)


@register
@dataclass(frozen=True)
class Heartbeat(Message):
    """Both directions: liveness plus the sender's load (queue lengths, KV use ...).

    Encoders report completed encode batches as `load["batches_done"]` (a running count).
    """

    TYPE: ClassVar[int] = 0x04
    worker_id: str
    seq: int
    t_sent: float
    load: Json = field(default_factory=dict)


@register
@dataclass(frozen=True)
class Shutdown(Message):
    """Coordinator -> worker: stop; with drain, finish in-flight work first."""

    TYPE: ClassVar[int] = 0x05
    reason: str = ""
    drain: bool = True


# ---------------------------------------------------------------- client-facing (0x1_)


@register
@dataclass(frozen=True)
class Submit(Message):
    """Client -> coordinator: one generation request (exactly one of prompt / prompt_ids).

    `timeout_s` counts from the server's arrival time (relative, so clocks need not agree).
    """

    TYPE: ClassVar[int] = 0x10
    req_id: str
    prompt: str | None = None
    prompt_ids: tuple[int, ...] | None = None
    max_new_tokens: int = 128
    sampling: Sampling = field(default_factory=Sampling)
    stream: bool = False
    timeout_s: float | None = None
    chat: bool = False

    def check(self) -> None:
        _check_id("req_id", self.req_id)
        if (self.prompt is None) == (self.prompt_ids is None):
            raise ValueError("give exactly one of prompt (text) or prompt_ids (token ids)")
        if self.prompt_ids is not None:
            _check_tokens("prompt_ids", self.prompt_ids)
            if not self.prompt_ids:
                raise ValueError("prompt_ids must not be empty")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")


@register
@dataclass(frozen=True)
class StreamChunk(Message):
    """Coordinator -> client: new tokens; `index` is the position of tokens[0] in the output."""

    TYPE: ClassVar[int] = 0x11
    req_id: str
    index: int
    tokens: tuple[int, ...]
    text: str | None = None

    def check(self) -> None:
        if self.index < 0:
            raise ValueError(f"index must be >= 0, got {self.index}")


@register
@dataclass(frozen=True)
class Result(Message):
    """Coordinator -> client: the whole output of a finished request."""

    TYPE: ClassVar[int] = 0x12
    req_id: str
    tokens: tuple[int, ...]
    finish_reason: str
    text: str | None = None
    num_prompt_tokens: int = 0
    lifecycle: Lifecycle = field(default_factory=Lifecycle)

    def check(self) -> None:
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}")


@register
@dataclass(frozen=True)
class Cancel(Message):
    """Client -> coordinator -> workers: stop a request and free its KV everywhere."""

    TYPE: ClassVar[int] = 0x13
    req_id: str
    reason: str = ""


@register
@dataclass(frozen=True)
class Error(Message):
    """Any direction: a failure, with a code from common.errors.ERROR_CODES."""

    TYPE: ClassVar[int] = 0x14
    code: str
    message: str
    req_id: str | None = None
    retry_after_s: float | None = None

    def check(self) -> None:
        if self.code not in ERROR_CODES:
            raise ValueError(f"unknown error code {self.code!r}; use one of {sorted(ERROR_CODES)}")


def error_for(exc: BaseException, req_id: str | None = None) -> Error:
    """The Error that reports `exc` to a peer: ProtocolError -> "protocol_error" (with the
    req_id it could still read), ServerError -> its own code, anything else -> "internal"."""
    if isinstance(exc, ProtocolError):
        return Error("protocol_error", str(exc), req_id or exc.req_id)
    if isinstance(exc, ServerError):
        return Error(exc.code, exc.message, req_id or exc.req_id, exc.retry_after_s)
    return Error("internal", f"{type(exc).__name__}: {exc}", req_id)


@register
@dataclass(frozen=True)
class StatsRequest(Message):
    """Ask for stats; the reply's req_id matches."""

    TYPE: ClassVar[int] = 0x15
    req_id: str
    include_requests: bool = False


@register
@dataclass(frozen=True)
class Stats(Message):
    """Stats (JSON-like tree) plus, on request, each finished request's lifecycle."""

    TYPE: ClassVar[int] = 0x16
    req_id: str
    stats: Json = field(default_factory=dict)
    requests: dict[str, Lifecycle] = field(default_factory=dict)


# ---------------------------------------------------------------- data plane (0x2_)


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

    def check(self) -> None:
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
