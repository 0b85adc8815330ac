"""T5 building blocks, sharded by heads (attention) and by FFN columns (Megatron style).

Each rank holds ``num_heads / tp_size`` heads of every attention (Q/K/V rows, O columns, and the
matching columns of the relative-position table) and ``1 / tp_size`` of the FFN width, so an
encoder layer costs two all-reduces and a decoder layer three (self-attention, cross-attention,
FFN), as in the paper's profile. Layers load themselves from a WeightSource by HF name.

Activations are "packed": the tokens of all sequences of a ragged batch in one ``[tokens, d]``
matrix, so the linears never compute on padding; only attention is done per sequence (encode)
or over the padded cache view with a length mask (decode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.engine.kernels import decode_attention
from common.engine.kv_cache import CacheBatch, KVCache
from common.engine.tp import ColumnParallelLinear, RowParallelLinear, ShardSpec, TPGroup
from common.models.config import ModelConfig
from common.models.t5_math import activation_fn, t5_rms_norm
from common.models.weights import WeightSource


class T5Norm(nn.Module):
    """Scale-only layer norm (replicated on every rank)."""

    def __init__(self, hidden: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden, dtype=dtype, device=device),
                                   requires_grad=False)

    def load(self, src: WeightSource, name: str) -> None:
        value = src.get(name)
        if tuple(value.shape) != tuple(self.weight.shape):
            raise ValueError(f"weight {name!r} has shape {tuple(value.shape)}, expected "
                             f"{tuple(self.weight.shape)}")
        with torch.no_grad():
            self.weight.copy_(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return t5_rms_norm(x, self.weight, self.eps)


class Shard:
    """This rank's slice of the heads and of the FFN width (fixed at build time)."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup, head_range: tuple[int, int]) -> None:
        self.tp = tp
        self.head_start, self.head_end = head_range
        self.head_dim = cfg.head_dim
        chunk = -(-cfg.ffn_size // tp.tp_size)
        self.ffn_start = min(tp.tp_rank * chunk, cfg.ffn_size)
        self.ffn_end = min(self.ffn_start + chunk, cfg.ffn_size)

    @property
    def num_heads(self) -> int:
        return self.head_end - self.head_start

    @property
    def inner(self) -> int:
        return self.num_heads * self.head_dim

    def rows(self, name: str) -> ShardSpec:
        """Output rows of a Q/K/V projection that belong to this rank's heads."""
        return ShardSpec(name, self.head_start * self.head_dim, self.head_end * self.head_dim)

    def ffn(self, name: str) -> ShardSpec:
        return ShardSpec(name, self.ffn_start, self.ffn_end)


def _column(cfg: ModelConfig, out_local: int, shard: Shard, dtype: torch.dtype,
            device: torch.device) -> ColumnParallelLinear:
    return ColumnParallelLinear(cfg.hidden_size, out_local, False, shard.tp, dtype, device)


def _row(cfg: ModelConfig, in_local: int, shard: Shard, dtype: torch.dtype,
         device: torch.device) -> RowParallelLinear:
    return RowParallelLinear(in_local, cfg.hidden_size, False, shard.tp, dtype, device)


class FeedForward(nn.Module):
    """``wo(act(wi x))`` (original T5) or ``wo(act(wi_0 x) * wi_1 x)`` (v1.1 gated-gelu)."""

    def __init__(self, cfg: ModelConfig, shard: Shard, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.gated = cfg.gated_ffn
        self.shard = shard
        width = shard.ffn_end - shard.ffn_start
        self.wi = _column(cfg, width * (2 if self.gated else 1), shard, dtype, device)
        self.wo = _row(cfg, width, shard, dtype, device)
        self.act = activation_fn(cfg.activation)

    def load(self, src: WeightSource, prefix: str) -> None:
        if self.gated:
            parts = [self.shard.ffn(prefix + ".wi_0"), self.shard.ffn(prefix + ".wi_1")]
        else:
            parts = [self.shard.ffn(prefix + ".wi")]
        self.wi.load(src, parts)
        self.wo.load(src, ShardSpec(prefix + ".wo", self.shard.ffn_start, self.shard.ffn_end))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.wi(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.wo(h)


class SelfAttention(nn.Module):
    """Fused Q/K/V (this rank's heads) and the output projection; no 1/sqrt(d) scaling."""

    def __init__(self, cfg: ModelConfig, shard: Shard, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.shard = shard
        self.qkv = _column(cfg, 3 * shard.inner, shard, dtype, device)
        self.o = _row(cfg, shard.inner, shard, dtype, device)

    def load(self, src: WeightSource, prefix: str) -> None:
        self.qkv.load(src, [self.shard.rows(f"{prefix}.{n}") for n in ("q", "k", "v")])
        self.o.load(src, ShardSpec(prefix + ".o", self.shard.head_start * self.shard.head_dim,
                                   self.shard.head_end * self.shard.head_dim))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Packed ``[T, d]`` -> q, k, v each ``[T, heads, head_dim]``."""
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.shard.num_heads, -1).unbind(1)
        return q, k, v

    def encode(self, x: torch.Tensor, lengths: list[int], bias: torch.Tensor) -> torch.Tensor:
        """Bidirectional attention within each sequence of a packed batch; ``bias`` is the
        ``[1, heads, L, L]`` position bias of the longest sequence (sliced per sequence)."""
        q, k, v = self.project(x)
        outs = []
        start = 0
        for n in lengths:
            qs, ks, vs = (t[start:start + n].transpose(0, 1) for t in (q, k, v))
            outs.append(F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=bias[0, :, :n, :n], scale=1.0).transpose(0, 1))
            start += n
        return self.o(torch.cat(outs).reshape(x.shape[0], -1))


class CrossAttention(nn.Module):
    """Decoder queries against the cached encoder K/V (written once, by ``CrossKV``)."""

    def __init__(self, cfg: ModelConfig, shard: Shard, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.shard = shard
        self.q = _column(cfg, shard.inner, shard, dtype, device)
        self.o = _row(cfg, shard.inner, shard, dtype, device)

    def load(self, src: WeightSource, prefix: str) -> None:
        self.q.load(src, [self.shard.rows(prefix + ".q")])
        self.o.load(src, ShardSpec(prefix + ".o", self.shard.head_start * self.shard.head_dim,
                                   self.shard.head_end * self.shard.head_dim))

    def decode(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               pad_mask: torch.Tensor) -> torch.Tensor:
        q = self.q(x).view(x.shape[0], self.shard.num_heads, -1)
        out = decode_attention(q, k, v, pad_mask, scale=1.0)
        return self.o(out.reshape(x.shape[0], -1))


@dataclass
class DecodeContext:
    """What every decoder layer of one decode step shares (computed once per step)."""

    cache: KVCache
    self_batch: CacheBatch  # self-attention slots and lengths before this step
    cross_batch: CacheBatch  # cross-attention slots and encoder lengths
    self_mask: torch.Tensor  # [B, L + 1] True = masked
    cross_mask: torch.Tensor  # [B, E] True = masked
    bias: torch.Tensor  # [B, heads, L + 1] relative-position bias of the new tokens


class EncoderLayer(nn.Module):
    """x + attn(norm(x)), then + ffn(norm(x)); bidirectional, over a packed ragged batch."""

    def __init__(self, cfg: ModelConfig, shard: Shard, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.attn_norm = T5Norm(cfg.hidden_size, cfg.norm_eps, dtype, device)
        self.attn = SelfAttention(cfg, shard, dtype, device)
        self.ffn_norm = T5Norm(cfg.hidden_size, cfg.norm_eps, dtype, device)
        self.ffn = FeedForward(cfg, shard, dtype, device)

    def load(self, src: WeightSource, prefix: str) -> None:
        self.attn_norm.load(src, f"{prefix}.layer.0.layer_norm.weight")
        self.attn.load(src, f"{prefix}.layer.0.SelfAttention")
        self.ffn_norm.load(src, f"{prefix}.layer.1.layer_norm.weight")
        self.ffn.load(src, f"{prefix}.layer.1.DenseReluDense")

    def forward(self, x: torch.Tensor, lengths: list[int], bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn.encode(self.attn_norm(x), lengths, bias)
        return x + self.ffn(self.ffn_norm(x))


class DecoderLayer(nn.Module):
    """Causal self-attention (cached), cross-attention (cached at encode), FFN; pre-norm."""

    def __init__(self, cfg: ModelConfig, layer: int, shard: Shard, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.layer = layer
        self.self_norm = T5Norm(cfg.hidden_size, cfg.norm_eps, dtype, device)
        self.self_attn = SelfAttention(cfg, shard, dtype, device)
        self.cross_norm = T5Norm(cfg.hidden_size, cfg.norm_eps, dtype, device)
        self.cross_kv = CrossKV(cfg, layer, shard, dtype, device)
        self.cross_attn = CrossAttention(cfg, shard, dtype, device)
        self.ffn_norm = T5Norm(cfg.hidden_size, cfg.norm_eps, dtype, device)
        self.ffn = FeedForward(cfg, shard, dtype, device)

    def load(self, src: WeightSource, prefix: str) -> None:
        self.self_norm.load(src, f"{prefix}.layer.0.layer_norm.weight")
        self.self_attn.load(src, f"{prefix}.layer.0.SelfAttention")
        self.cross_norm.load(src, f"{prefix}.layer.1.layer_norm.weight")
        self.cross_kv.load(src, prefix)
        self.cross_attn.load(src, f"{prefix}.layer.1.EncDecAttention")
        self.ffn_norm.load(src, f"{prefix}.layer.2.layer_norm.weight")
        self.ffn.load(src, f"{prefix}.layer.2.DenseReluDense")

    def write_cross(self, cache: KVCache, slots: list[int], lengths: list[int],
                    encoder_out: torch.Tensor) -> None:
        self.cross_kv.write_cross(cache, slots, lengths, encoder_out)

    def forward(self, x: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        x = x + self._self_attention(self.self_norm(x), ctx)
        h = self.cross_norm(x)
        keys = ctx.cache.view(self.layer, "cross_k", ctx.cross_batch, ctx.cross_batch.max_len)
        values = ctx.cache.view(self.layer, "cross_v", ctx.cross_batch, ctx.cross_batch.max_len)
        x = x + self.cross_attn.decode(h, keys, values, ctx.cross_mask)
        return x + self.ffn(self.ffn_norm(x))

    def _self_attention(self, x: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        q, k, v = self.self_attn.project(x)
        ctx.cache.append(self.layer, "k", ctx.self_batch, k)
        ctx.cache.append(self.layer, "v", ctx.self_batch, v)
        length = ctx.self_batch.max_len + 1
        keys = ctx.cache.view(self.layer, "k", ctx.self_batch, length)
        values = ctx.cache.view(self.layer, "v", ctx.self_batch, length)
        out = decode_attention(q, keys, values, ctx.self_mask, 1.0, ctx.bias)
        return self.self_attn.o(out.reshape(x.shape[0], -1))


class CrossKV(nn.Module):
    """Only the cross-attention K/V projection of decoder layer ``layer``: what an encoder
    worker needs to hand the cross K/V to decoder workers without holding the decoder."""

    def __init__(self, cfg: ModelConfig, layer: int, shard: Shard, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.layer, self.shard = layer, shard
        self.kv = _column(cfg, 2 * shard.inner, shard, dtype, device)

    def load(self, src: WeightSource, prefix: str) -> None:
        names = [f"{prefix}.layer.1.EncDecAttention.{n}" for n in ("k", "v")]
        self.kv.load(src, [self.shard.rows(n) for n in names])

    def write_cross(self, cache: KVCache, slots: list[int], lengths: list[int],
                    encoder_out: torch.Tensor) -> None:
        """Cross K/V of every sequence of a packed encoder output ``[T, d]``, into the cache."""
        kv = self.kv(encoder_out).view(encoder_out.shape[0], 2, self.shard.num_heads, -1)
        k, v = kv.transpose(0, 2).unbind(1)  # each [heads, T, head_dim]
        start = 0
        for slot, n in zip(slots, lengths, strict=True):
            cache.write(self.layer, "cross_k", slot, 0, k[:, start:start + n])
            cache.write(self.layer, "cross_v", slot, 0, v[:, start:start + n])
            start += n

