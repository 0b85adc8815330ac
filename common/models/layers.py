"""Building blocks shared by the decoder-only families: norms, RoPE, MLP, attention, the layer.

Every block has the two phases of the engine: ``prefill`` over a packed ragged batch of prompt
tokens and ``decode`` over one token per sequence. Attention writes its K/V into the stage's
KVCache and reads them back from it, so both phases see identical (cache-dtype) keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.engine import native
from common.engine.kernels import (
    length_mask,
    mask_bias,
    prefill_attention,
    sdpa_decode_attention,
)
from common.engine.kv_cache import CacheBatch, KVCache
from common.engine.native_layer import LayerShape, LayerWeights, StepPlan
from common.engine.tp import (
    ColumnParallelLinear,
    RowParallelLinear,
    ShardSpec,
    TPGroup,
    head_range,
    kv_head_range,
)
from common.models.config import ModelConfig
from common.models.weights import WeightSource


@dataclass
class PassContext:
    """What every layer of one encode/decode pass shares (computed once per pass)."""

    cache: KVCache
    req_ids: list[str]
    slots: list[int]
    starts: list[int]  # cached positions before this pass, per sequence
    seq_lens: list[int]  # new tokens per sequence
    positions: torch.Tensor  # [T] absolute position of every new token
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin [T, D]
    batch: CacheBatch | None = None  # decode only
    score_bias: torch.Tensor | None = None  # decode: [B, 1, 1, L] 0 / -inf; None if uniform
    attend_lengths: torch.Tensor | None = None  # decode: int64 [B], cached + 1 (C kernel)
    fused: StepPlan | None = None  # decode: whole layers in one C call (native_layer.py)

    @property
    def is_decode(self) -> bool:
        return self.batch is not None


class Norm(nn.Module):
    """RMSNorm (llama: float32 statistics, weight applied in the input dtype) or LayerNorm.

    bf16 RMSNorm follows transformers' order exactly (normalise in float32, round to bf16, then
    multiply by the bf16 weight; ``F.rms_norm`` would round once, after the weight): through
    the C kernel when available (also ~5x faster than ``F.rms_norm`` at decode sizes)."""

    def __init__(self, size: int, eps: float, rms: bool, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        self.rms, self.eps = rms, eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = None if rms else nn.Parameter(
            torch.zeros(size, dtype=dtype, device=device), requires_grad=False)

    def load(self, src: WeightSource, name: str) -> None:
        from common.engine.tp import _copy_checked

        _copy_checked(self.weight, src.get(name + ".weight"), [name + ".weight"])
        if self.bias is not None:
            _copy_checked(self.bias, src.get(name + ".bias"), [name + ".bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.rms:
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        if x.dim() == 2 and native.usable(x):
            y = native.rms_norm(x, self.weight, self.eps)
            if y is not None:
                return y
        normed = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)
        return normed.mul_(self.weight)


class Rope(nn.Module):
    """Rotary embedding tables (HF ``rotate_half`` convention), built in float32 once."""

    def __init__(self, head_dim: int, theta: float, max_position: int,
                 device: torch.device | str) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                                device=device) / head_dim)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32, device=device),
                            inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        sin = emb.sin()
        sin[:, : head_dim // 2] *= -1  # rotate_half(x) * sin == roll(x, D/2) * signed_sin
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos and sign-folded sin (``Rope.tables``): [T, D] or [T, 1, D].

    Same operations and roundings as transformers (``q * cos + rotate_half(q) * sin`` in the
    input dtype; the folded sign is exact). bf16 on a CPU with the C kernels: rotated in place
    (``x`` is the fresh QKV projection's view) and returned."""
    if native.usable(x) and native.rope_(x, cos, sin):
        return x
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotated = torch.roll(x, x.shape[-1] // 2, dims=-1)
    return (x * cos).add_(rotated.mul_(sin))


ACTIVATIONS = {
    "relu": F.relu,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


class MLP(nn.Module):
    """Gated (SwiGLU: fused gate/up column-parallel) or plain fc1 -> act -> fc2."""

    def __init__(self, cfg: ModelConfig, gated: bool, bias: bool, tp: TPGroup,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        from common.engine.tp import even_range

        if cfg.ffn_size % tp.tp_size:
            raise ValueError(f"tp_size={tp.tp_size} does not divide ffn_size={cfg.ffn_size}")
        self.gated = gated
        self.ffn_range = even_range(cfg.ffn_size, tp.tp_size, tp.tp_rank)
        local = self.ffn_range[1] - self.ffn_range[0]
        self.up = ColumnParallelLinear(cfg.hidden_size, local * (2 if gated else 1), bias, tp,
                                       dtype, device)
        self.down = RowParallelLinear(local, cfg.hidden_size, bias, tp, dtype, device)
        self.act = ACTIVATIONS[cfg.activation]

    def load(self, src: WeightSource, up_names: list[str], down_name: str,
             transposed: bool = False) -> None:
        lo, hi = self.ffn_range
        self.up.load(src, [ShardSpec(n, lo, hi, transposed) for n in up_names])
        self.down.load(src, ShardSpec(down_name, lo, hi, transposed))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The block's output, plus ``residual`` if given (fused into the down projection)."""
        h = self.up(x)
        if self.gated and self.act is F.silu and h.dim() == 2 and native.usable(h):
            fused = native.swiglu(h)
            if fused is not None:
                return self.down(fused, residual)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate).mul_(up)
        else:
            h = self.act(h)
        return self.down(h, residual)


class Attention(nn.Module):
    """Self-attention over this rank's heads with a fused QKV projection."""

    def __init__(self, cfg: ModelConfig, layer: int, bias: bool, out_bias: bool,
                 tp: TPGroup, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.layer, self.head_dim = layer, cfg.head_dim
        self.q_range = head_range(cfg.num_heads, tp)
        self.kv_range = kv_head_range(cfg.kv_heads, cfg.num_heads, tp)
        self.num_q = self.q_range[1] - self.q_range[0]
        self.num_kv = self.kv_range[1] - self.kv_range[0]
        self.scale = cfg.head_dim ** -0.5
        qkv_out = (self.num_q + 2 * self.num_kv) * cfg.head_dim
        self.qkv = ColumnParallelLinear(cfg.hidden_size, qkv_out, bias, tp, dtype, device)
        self.o = RowParallelLinear(self.num_q * cfg.head_dim, cfg.hidden_size, out_bias, tp,
                                   dtype, device)

    def qkv_specs(self, q: str, k: str, v: str, kv_offset: int = 0,
                  transposed: bool = False) -> list[ShardSpec]:
        """Rows of this rank's heads; ``kv_offset`` locates K/V inside a fused source tensor."""
        d = self.head_dim
        q0, q1 = self.q_range
        k0, k1 = self.kv_range
        return [ShardSpec(q, q0 * d, q1 * d, transposed),
                ShardSpec(k, kv_offset + k0 * d, kv_offset + k1 * d, transposed),
                ShardSpec(v, 2 * kv_offset + k0 * d, 2 * kv_offset + k1 * d, transposed)]

    def o_spec(self, name: str, transposed: bool = False) -> ShardSpec:
        return ShardSpec(name, self.q_range[0] * self.head_dim, self.q_range[1] * self.head_dim,
                         transposed)

    def _project(self, x: torch.Tensor, ctx: PassContext
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d, heads = self.head_dim, self.num_q + self.num_kv
        qkv = self.qkv(x)
        qk, v = qkv.split([heads * d, self.num_kv * d], dim=-1)
        qk = qk.view(-1, heads, d)
        if ctx.rope is not None:  # one rotation for the query and key heads together
            qk = apply_rope(qk, *ctx.rope)
        q, k = qk.split([self.num_q, self.num_kv], dim=1)
        return q, k, v.view(-1, self.num_kv, d)

    def forward(self, x: torch.Tensor, ctx: PassContext,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """The block's output, plus ``residual`` if given (fused into the output projection)."""
        q, k, v = self._project(x, ctx)
        out = self._decode(q, k, v, ctx) if ctx.is_decode else self._prefill(q, k, v, ctx)
        return self.o(out.reshape(x.shape[0], self.num_q * self.head_dim), residual)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 ctx: PassContext) -> torch.Tensor:
        outs, offset = [], 0
        for slot, start, n in zip(ctx.slots, ctx.starts, ctx.seq_lens, strict=True):
            rows = slice(offset, offset + n)
            ctx.cache.write(self.layer, "k", slot, start, k[rows].transpose(0, 1))
            ctx.cache.write(self.layer, "v", slot, start, v[rows].transpose(0, 1))
            keys = ctx.cache.prefix(self.layer, "k", slot, start + n)
            values = ctx.cache.prefix(self.layer, "v", slot, start + n)
            out = prefill_attention(q[rows].transpose(0, 1), keys, values, self.scale)
            outs.append(out.transpose(0, 1))
            offset += n
        return torch.cat(outs, dim=0)

    def _decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                ctx: PassContext) -> torch.Tensor:
        assert ctx.batch is not None
        if ctx.attend_lengths is not None:  # the C kernel appends k, v and attends
            out = native.decode_attention(
                q, ctx.cache.layer_buffer(self.layer, "k"), ctx.cache.layer_buffer(self.layer, "v"),
                ctx.batch.slots, ctx.attend_lengths, self.scale, k, v)
            if out is not None:
                return out
        ctx.cache.append(self.layer, "k", ctx.batch, k)
        ctx.cache.append(self.layer, "v", ctx.batch, v)
        length = ctx.batch.max_len + 1
        keys = ctx.cache.view(self.layer, "k", ctx.batch, length)
        values = ctx.cache.view(self.layer, "v", ctx.batch, length)
        return sdpa_decode_attention(q, keys, values, ctx.score_bias, self.scale)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm1(x)), then + mlp(norm2(x)).

    A llama-style layer (RMSNorm, SwiGLU, RoPE, one TP rank, weights packed for the C
    kernels) runs a bf16 decode step as one C call (``native_layer``): same kernels, same
    order, so the same numbers as the module path, which stays the fallback."""

    def __init__(self, attn: Attention, mlp: MLP, norm1: Norm, norm2: Norm) -> None:
        super().__init__()
        self.attn, self.mlp, self.norm1, self.norm2 = attn, mlp, norm1, norm2
        self._fused: LayerWeights | None = None
        self._fused_checked = False

    def forward(self, x: torch.Tensor, ctx: PassContext) -> torch.Tensor:
        if ctx.fused is not None:
            weights = self.fused_weights()
            if weights is not None:
                out = ctx.fused.run_layer(weights, x,
                                          ctx.cache.layer_buffer(self.attn.layer, "k"),
                                          ctx.cache.layer_buffer(self.attn.layer, "v"))
                if out is not None:
                    return out
        # Residual adds into the fresh block outputs (never into ``x``: it may be the caller's).
        x = self.attn(self.norm1(x), ctx, residual=x)
        return self.mlp(self.norm2(x), residual=x)

    def fused_shape(self) -> LayerShape:
        a, f = self.attn, self.mlp.ffn_range
        return LayerShape(hidden=self.norm1.weight.shape[0], hq=a.num_q, hkv=a.num_kv,
                          head_dim=a.head_dim, ffn=f[1] - f[0], eps=self.norm1.eps,
                          scale=a.scale)

    def fused_weights(self) -> LayerWeights | None:
        """This layer's weights for the one-call kernel (built on first use after the
        weights were packed), or None when the layer does not fit it."""
        if not self._fused_checked:
            a, m, n1, n2 = self.attn, self.mlp, self.norm1, self.norm2
            fits = (n1.rms and n2.rms and n1.eps == n2.eps and m.gated and m.act is F.silu
                    and a.o.tp.tp_size == 1 and m.down.tp.tp_size == 1)
            self._fused = LayerWeights.of(self.fused_shape(), n1.weight, n2.weight, {
                "qkv": (a.qkv.packed, a.qkv.bias), "o": (a.o.packed, a.o.bias),
                "up": (m.up.packed, m.up.bias), "down": (m.down.packed, m.down.bias),
            }) if fits else None
            self._fused_checked = self._fused is not None or a.qkv.packed is not None
        return self._fused

    def step_plan(self, ctx: PassContext) -> StepPlan | None:
        """The per-step state of the one-call kernel (every layer of a stage shares it)."""
        if ctx.rope is None or ctx.attend_lengths is None or ctx.batch is None \
                or self.fused_weights() is None:
            return None
        return StepPlan.build(self.fused_shape(), ctx.rope[0], ctx.rope[1], ctx.batch.slots,
                              ctx.attend_lengths,
                              ctx.cache.layer_buffer(self.attn.layer, "k"),
                              ctx.cache.layer_buffer(self.attn.layer, "v"))


def native_attend_lengths(batch: CacheBatch, dtype: torch.dtype) -> torch.Tensor | None:
    """Positions each sequence attends to in a decode step, when the C attention kernel will
    run it (bf16 on a CPU with the kernels built), else None."""
    if dtype != torch.bfloat16 or batch.lengths.device.type != "cpu" or native.lib() is None:
        return None
    return (batch.lengths + 1).to(torch.int64)


def decode_bias(batch: CacheBatch, dtype: torch.dtype) -> torch.Tensor | None:
    """Score bias of a decode step: each sequence sees its cached positions plus the new one
    (None when all have the same length: nothing to mask)."""
    if batch.uniform:
        return None
    return mask_bias(length_mask(batch.lengths + 1, batch.max_len + 1), dtype)
