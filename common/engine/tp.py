"""Megatron-style tensor parallelism: layers that shard themselves when loaded from a WeightSource.

Vocabulary (Megatron-LM): a ``ColumnParallelLinear`` splits its output features across the
``tp_size`` ranks (each rank computes a slice, no communication); a ``RowParallelLinear`` splits
its input features and all-reduces the partial sums; ``VocabParallelEmbedding`` and
``ParallelLMHead`` split the vocabulary. A transformer layer therefore costs two all-reduces
(attention output, MLP output). At ``tp_size == 1`` every collective is skipped.

Loading: each layer receives ``ShardSpec`` parts naming the global (HF) tensor and the global
range this rank owns, and reads only that slice from the WeightSource, so no rank ever holds the
whole model. The head-range helpers below decide those ranges, including GQA KV heads that are
replicated when ``tp_size > num_kv_heads``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from common.engine.kernels import DecodeWeight, linear, logits_linear, pack_for_decode
from common.models.weights import WeightSource


@dataclass(frozen=True)
class TPGroup:
    """This rank's place in its tensor-parallel group; ``group`` is a torch ProcessGroup."""

    tp_size: int = 1
    tp_rank: int = 0
    group: Any = None

    def __post_init__(self) -> None:
        if self.tp_size < 1 or not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"bad TP group: tp_rank={self.tp_rank}, tp_size={self.tp_size}")
        if self.tp_size > 1 and self.group is None:
            raise ValueError("a TPGroup with tp_size > 1 needs a torch.distributed process group")

    @staticmethod
    def single() -> TPGroup:
        return TPGroup()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the group in place (gloo lacks bf16 sums: reduce in float32)."""
        if self.tp_size == 1:
            return x
        if x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu":
            wide = x.float()
            dist.all_reduce(wide, group=self.group)
            x.copy_(wide)
            return x
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor, full_size: int) -> torch.Tensor:
        """Concatenate each rank's last-dim slice (sizes from ``even_range``) into ``full_size``."""
        if self.tp_size == 1:
            return x
        chunk = -(-full_size // self.tp_size)
        padded = x
        if x.shape[-1] < chunk:
            padded = torch.nn.functional.pad(x, (0, chunk - x.shape[-1]))
        parts = [torch.empty_like(padded) for _ in range(self.tp_size)]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)[..., :full_size]


def even_range(total: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """Rank's contiguous slice of ``total`` items, ceil-sized (the last rank may get fewer)."""
    chunk = -(-total // tp_size)
    start = min(tp_rank * chunk, total)
    return start, min(start + chunk, total)


def head_range(num_heads: int, tp: TPGroup) -> tuple[int, int]:
    """Query heads owned by this rank; heads must split evenly."""
    if num_heads % tp.tp_size:
        raise ValueError(
            f"tp_size={tp.tp_size} does not divide num_heads={num_heads}; "
            f"choose a tp_size among {[d for d in range(1, num_heads + 1) if num_heads % d == 0]}"
        )
    per_rank = num_heads // tp.tp_size
    return tp.tp_rank * per_rank, (tp.tp_rank + 1) * per_rank


def kv_head_range(num_kv_heads: int, num_heads: int, tp: TPGroup) -> tuple[int, int]:
    """KV heads this rank needs: split when tp_size <= num_kv_heads, else one replicated head."""
    head_range(num_heads, tp)
    if tp.tp_size <= num_kv_heads:
        if num_kv_heads % tp.tp_size:
            raise ValueError(
                f"tp_size={tp.tp_size} does not divide num_kv_heads={num_kv_heads}"
            )
        per_rank = num_kv_heads // tp.tp_size
        return tp.tp_rank * per_rank, (tp.tp_rank + 1) * per_rank
    if tp.tp_size % num_kv_heads:
        raise ValueError(
            f"tp_size={tp.tp_size} > num_kv_heads={num_kv_heads} must be a multiple of it "
            "so each KV head is replicated on whole ranks"
        )
    head = tp.tp_rank // (tp.tp_size // num_kv_heads)
    return head, head + 1


@dataclass(frozen=True)
class ShardSpec:
    """One source tensor's slice: rows [start, end) of the output (column-parallel) or columns
    of the input (row-parallel). ``transposed``: stored as [in, out] (GPT-2 Conv1D)."""

    name: str
    start: int
    end: int
    transposed: bool = False


def _read(src: WeightSource, name: str, dim: int, start: int, end: int) -> torch.Tensor:
    return src.get(name, dim=dim, start=start, end=end)


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class ColumnParallelLinear(nn.Module):
    """y_local = x W_local^T (+ b_local); several ShardSpecs fuse e.g. Q, K and V in one matmul."""

    def __init__(self, in_features: int, out_local: int, bias: bool, tp: TPGroup,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.tp = tp
        self.weight = _param(torch.empty(out_local, in_features, dtype=dtype, device=device))
        self.bias = _param(torch.empty(out_local, dtype=dtype, device=device)) if bias else None
        self.packed: DecodeWeight = None

    def pack_for_decode(self, rows_hint: int = 1) -> None:
        self.packed = pack_for_decode(self.weight, rows_hint)

    def load(self, src: WeightSource, parts: list[ShardSpec]) -> None:
        rows = [_column_rows(src, p) for p in parts]
        _copy_checked(self.weight, torch.cat(rows, dim=0), [p.name for p in parts])
        if self.bias is not None:
            biases = [_read(src, p.name + ".bias", 0, p.start, p.end) for p in parts]
            _copy_checked(self.bias, torch.cat(biases), [p.name + ".bias" for p in parts])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed)


def _column_rows(src: WeightSource, part: ShardSpec) -> torch.Tensor:
    if part.transposed:
        return _read(src, part.name + ".weight", 1, part.start, part.end).t()
    return _read(src, part.name + ".weight", 0, part.start, part.end)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local W_local^T) + b; the bias is added once, after the reduction."""

    def __init__(self, in_local: int, out_features: int, bias: bool, tp: TPGroup,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.tp = tp
        self.weight = _param(torch.empty(out_features, in_local, dtype=dtype, device=device))
        self.bias = _param(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self.packed: DecodeWeight = None

    def pack_for_decode(self, rows_hint: int = 1) -> None:
        self.packed = pack_for_decode(self.weight, rows_hint)

    def load(self, src: WeightSource, part: ShardSpec) -> None:
        name = part.name + ".weight"
        if part.transposed:
            w = _read(src, name, 0, part.start, part.end).t()
        else:
            w = _read(src, name, 1, part.start, part.end)
        _copy_checked(self.weight, w, [name])
        if self.bias is not None:
            _copy_checked(self.bias, src.get(part.name + ".bias"), [part.name + ".bias"])

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``residual`` (optional) is added after the reduction and bias, in one kernel when
        there is nothing to reduce."""
        if self.tp.tp_size == 1:
            return linear(x, self.weight, self.bias, self.packed, residual)
        y = linear(x, self.weight, None, self.packed)
        y = self.tp.all_reduce(y)
        y = y if self.bias is None else y.add_(self.bias)
        return y if residual is None else y.add_(residual)


class VocabParallelEmbedding(nn.Module):
    """Each rank embeds the ids in its vocabulary slice, zeros the rest; all-reduce sums them."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.start, self.end = even_range(vocab_size, tp.tp_size, tp.tp_rank)
        self.weight = _param(torch.empty(self.end - self.start, hidden_size, dtype=dtype,
                                         device=device))

    def load(self, src: WeightSource, name: str) -> None:
        _copy_checked(self.weight, _read(src, name, 0, self.start, self.end), [name])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.tp_size == 1:
            return nn.functional.embedding(ids, self.weight)
        outside = (ids < self.start) | (ids >= self.end)
        local = (ids - self.start).masked_fill(outside, 0)
        out = nn.functional.embedding(local, self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for this rank's vocabulary slice, gathered into the full vocabulary."""

    packed: DecodeWeight = None

    def pack_for_decode(self, rows_hint: int = 1) -> None:
        self.packed = pack_for_decode(self.weight, rows_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        logits = logits_linear(x, self.weight, self.packed)
        return self.tp.all_gather_last(logits, self.vocab_size)


def _copy_checked(param: nn.Parameter, value: torch.Tensor, names: list[str]) -> None:
    """Copy a loaded tensor into a parameter, failing with the tensor names on a shape mismatch."""
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(
            f"weight {', '.join(names)}: shape {tuple(value.shape)} does not match the "
            f"config's expected shard shape {tuple(param.shape)}"
        )
    with torch.no_grad():
        param.copy_(value)
