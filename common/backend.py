"""The math behind a worker: the backend interface and the null backend.

A worker process (encoder_worker, decoder_worker) is sockets + handshake + heartbeats + one
compute loop; the compute loop calls a backend and nothing else. ``NullBackend`` does no math
but moves real-sized KV and emits deterministic tokens at a configurable cost, so the whole mesh
can be tested and benchmarked without a model; the engine backend (issue 5) fills the same slots.

Null-model token rule (tests check it, so it is part of the contract)::

    null_token(prompt, i, vocab) = (sum(prompt) * 31 + len(prompt) * 7 + i * 1009) % vocab

for output position ``i`` (0 is the token the encode pass produces; a decoder continues from
it alone, as a real one continues from the KV: ``token_i = (token_0 + i * 1009) % vocab``).
The null model never stops early: a request gets exactly ``max_new_tokens`` tokens. Use
:func:`null_tokens` to compute the expected output of a request. A re-run after a worker loss
(``EncodeItem.output_offset = k``: the prompt ends with the k tokens already streamed) starts at
output position k of the original prompt, so the client's stream continues unchanged; a real
model gets the same from prefilling prompt + streamed tokens (greedy; seeded sampling too, as
its encoder samples position k and its decoder, told the offset by ``KVHandoff.output_offset``
-> ``DecodeSeq.output_offset``, continues at k + 1).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np

from common.models.config import ModelConfig
from common.tensorframe import WireTensor

KV_DTYPE = "bfloat16"
KV_DTYPE_BYTES = 2


def null_token(prompt: Sequence[int], position: int, vocab_size: int) -> int:
    return (sum(prompt) * 31 + len(prompt) * 7 + position * 1009) % vocab_size


def _first_token(item: EncodeItem, vocab_size: int) -> int:
    """A re-run continues the original request's sequence: the rule is a function of the
    original prompt (the prompt minus the output tokens appended to it) and the position."""
    original = item.prompt[:len(item.prompt) - item.output_offset]
    return null_token(original, item.output_offset, vocab_size)


def null_tokens(prompt: Sequence[int], max_new_tokens: int, vocab_size: int) -> list[int]:
    """The full output the null model gives a request (what a client must receive, in order)."""
    base = sum(prompt) * 31 + len(prompt) * 7
    return [(base + i * 1009) % vocab_size for i in range(max_new_tokens)]


@dataclass(frozen=True)
class EncodeItem:
    """One request inside an encode batch, as the encode backend sees it."""

    req_id: str
    prompt: tuple[int, ...]
    max_new_tokens: int
    sampling: Any = None  # protocol.Sampling (None: greedy); the null model ignores it
    output_offset: int = 0  # re-run: prompt ends with this many earlier output tokens

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError(f"request {self.req_id}: empty prompt")
        if self.max_new_tokens < 1:
            raise ValueError(f"request {self.req_id}: max_new_tokens must be >= 1")


@dataclass
class Encoded:
    """What one encode produces: the first output token and the KV tensors for the decoder."""

    req_id: str
    first_token: int
    seq_len: int
    kv: dict[str, Any]  # name -> tensor, [num_layers, num_kv_heads_in_range, len, head_dim]
    head_range: tuple[int, int] | None = None  # KV heads in kv (None: the worker's own)
    layer_range: tuple[int, int] | None = None  # layers in kv (None: all of the model's)


@dataclass
class DecodeSeq:
    """One running sequence on a decoder: its KV and how far it has got."""

    req_id: str
    prompt_len: int
    first_token: int  # produced by the encode pass (output position output_offset)
    max_new_tokens: int
    kv: dict[str, Any] = field(repr=False)
    num_generated: int = 1  # tokens produced so far, the first included
    head_range: tuple[int, int] | None = None  # KV heads the sender sent (None: this rank's)
    layer_range: tuple[int, int] | None = None  # layers the sender sent (None: this stage's)
    sampling: Any = None  # protocol.Sampling (None: greedy)
    # a re-run's offset: first_token is output position output_offset, so the seeded draw of
    # this run's n-th token (num_generated n) is position output_offset + n; num_generated
    # alone counts toward max_new_tokens (which a re-run already shortened by the offset)
    output_offset: int = 0


class StepToken(NamedTuple):
    """One sequence's new token from one decode step (a tuple: made for every token)."""

    req_id: str
    token: int
    position: int
    finished: bool
    reason: str | None = None  # "stop" (EOS / stop token) or "length"; None while running


class EncodeBackend(Protocol):
    def encode(self, items: Sequence[EncodeItem]) -> list[Encoded]: ...
    def idle(self) -> None: ...  # called about once a second while no batch comes
    def close(self) -> None: ...  # the worker is stopping


class DecodeBackend(Protocol):
    """A decoder's running batch: sequences join with their KV, leave when finished/cancelled."""

    def first_reason(self, seq: DecodeSeq) -> str | None: ...
    def add(self, seq: DecodeSeq) -> None: ...
    def remove(self, req_id: str) -> None: ...
    def step(self) -> list[StepToken]: ...
    def idle(self) -> None: ...  # called about once a second while nothing runs
    def close(self) -> None: ...  # the worker is stopping
    @property
    def num_active(self) -> int: ...


@dataclass(frozen=True)
class NullShape:
    """The slice of a model a worker holds (its layer and KV-head range) for sizing KV."""

    model: ModelConfig
    tp_rank: int = 0
    tp_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} outside tp_size {self.tp_size}")
        self.head_range()  # a tp_size the model's KV heads cannot split over fails here

    def head_range(self) -> tuple[int, int]:
        """KV heads of this rank (replicated when tp_size exceeds the KV head count)."""
        heads = self.model.kv_heads
        if self.tp_size >= heads:
            index = self.tp_rank * heads // self.tp_size
            return index, index + 1
        if heads % self.tp_size:
            raise ValueError(f"model {self.model.name or self.model.family}: {heads} KV heads "
                             f"do not split over tp_size {self.tp_size}; use a tp_size that "
                             f"divides {heads} (or one >= {heads})")
        per = heads // self.tp_size
        return self.tp_rank * per, (self.tp_rank + 1) * per

    def kv_shapes(self, prompt_len: int) -> dict[str, tuple[int, ...]]:
        """Tensor shapes a real encode of ``prompt_len`` tokens hands to the decoder."""
        first, last = self.head_range()
        heads, layers, dim = last - first, self.model.num_layers, self.model.head_dim
        if self.model.is_encoder_decoder:
            return {"k": (layers, heads, 0, dim), "v": (layers, heads, 0, dim),
                    "cross_k": (layers, heads, prompt_len, dim),
                    "cross_v": (layers, heads, prompt_len, dim)}
        return {"k": (layers, heads, prompt_len, dim), "v": (layers, heads, prompt_len, dim)}

    def kv_bytes(self, prompt_len: int) -> int:
        total = 0
        for shape in self.kv_shapes(prompt_len).values():
            count = 1
            for dim in shape:
                count *= dim
            total += count * KV_DTYPE_BYTES
        return total


def _spend(seconds: float) -> None:
    """Stand-in for device time: sleep, which (like a GPU kernel) leaves the CPU to I/O."""
    if seconds > 0:
        time.sleep(seconds)


class NullEncodeBackend:
    """Encode = allocate the real-sized KV (filled with a per-request pattern) + first token."""

    def __init__(self, shape: NullShape, cost_ms_per_batch: float = 0.0,
                 cost_ms_per_token: float = 0.0) -> None:
        self.shape = shape
        self.cost_ms_per_batch = cost_ms_per_batch
        self.cost_ms_per_token = cost_ms_per_token

    def idle(self) -> None:
        """Nothing runs between batches."""

    def close(self) -> None:
        """Nothing to release."""

    def encode(self, items: Sequence[EncodeItem]) -> list[Encoded]:
        tokens = sum(len(item.prompt) for item in items)
        _spend((self.cost_ms_per_batch + self.cost_ms_per_token * tokens) / 1000)
        vocab = self.shape.model.vocab_size
        return [Encoded(req_id=item.req_id, first_token=_first_token(item, vocab),
                        seq_len=len(item.prompt), kv=self._kv(item)) for item in items]

    def _kv(self, item: EncodeItem) -> dict[str, Any]:
        """bf16 tensors as raw 2-byte words (numpy, no torch import: workers start fast)."""
        fill = 0x3F80 + sum(item.prompt) % 127  # bf16 bit patterns of 1.0 .. 1.98
        return {name: WireTensor.from_buffer(KV_DTYPE, shape, _words(shape, fill))
                for name, shape in self.shape.kv_shapes(len(item.prompt)).items()}


def _words(shape: tuple[int, ...], fill: int) -> np.ndarray:
    """Flat bytes of a bf16 tensor whose every element has the bit pattern ``fill``."""
    return np.full(shape, fill, np.uint16).reshape(-1).view(np.uint8)


class NullDecodeBackend:
    """Decode = one deterministic token per running sequence per step, at a fixed cost."""

    def __init__(self, shape: NullShape, cost_ms_per_step: float = 0.0) -> None:
        self.shape = shape
        self.cost_ms_per_step = cost_ms_per_step
        self._seqs: dict[str, DecodeSeq] = {}

    @property
    def num_active(self) -> int:
        return len(self._seqs)

    def idle(self) -> None:
        """Nothing runs between steps."""

    def close(self) -> None:
        """Nothing to release."""

    def first_reason(self, seq: DecodeSeq) -> str | None:
        """The null model stops on length only."""
        return "length" if seq.max_new_tokens <= 1 else None

    def add(self, seq: DecodeSeq) -> None:
        self._check_kv(seq)
        if seq.req_id in self._seqs:
            raise ValueError(f"request {seq.req_id} is already decoding here")
        self._seqs[seq.req_id] = seq

    def remove(self, req_id: str) -> None:
        self._seqs.pop(req_id, None)

    def step(self) -> list[StepToken]:
        _spend(self.cost_ms_per_step / 1000)
        out = []
        vocab = self.shape.model.vocab_size
        for seq in list(self._seqs.values()):
            position = seq.num_generated
            seq.num_generated += 1
            finished = seq.num_generated >= seq.max_new_tokens
            token = (seq.first_token + position * 1009) % vocab
            out.append(StepToken(seq.req_id, token, position, finished,
                                 "length" if finished else None))
            if finished:
                del self._seqs[seq.req_id]
        return out

    def _check_kv(self, seq: DecodeSeq) -> None:
        """The KV that arrived must be exactly what an encode of this prompt produces, for a
        KV-head range that covers this rank's (a sender with another tp_size sends a wider
        range; the receiver keeps its own slice, as re-sharding does)."""
        first, last = seq.head_range if seq.head_range is not None else self.shape.head_range()
        mine = self.shape.head_range()
        if not first <= mine[0] < mine[1] <= last:
            raise ValueError(f"request {seq.req_id}: KV heads [{first}, {last}) do not cover "
                             f"this rank's heads [{mine[0]}, {mine[1]})")
        sender = NullShape(self.shape.model)
        want = {name: (shape[0], last - first, *shape[2:])
                for name, shape in sender.kv_shapes(seq.prompt_len).items()}
        got = {name: tuple(t.shape) for name, t in seq.kv.items()}
        if got != want:
            raise ValueError(f"request {seq.req_id}: KV shapes {got} do not match the model's "
                             f"{want} for a {seq.prompt_len}-token prompt")
