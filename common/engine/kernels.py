"""Attention and linear kernels chosen for decode speed on CPUs (see cpu-performance-notes.md).

Linears: bf16 CPU weights keep a decode copy: the C kernel's packed layout (``native.py``,
when gcc and AVX-512 BF16 are there: 1.3-2x oneDNN at 1-32 rows on this CPU) or else a
oneDNN-prepacked one (faster than both the plain oneDNN call and torch's native kernel at 1-32
rows). Prefill-sized inputs use the plain weight through oneDNN.

Decode attention of the decoder-only families is SDPA over zero-copy views of the cache
(``[B, Hkv, L, D]`` slices of a ``[slots, Hkv, capacity, D]`` buffer, GQA through
``enable_gqa``): the CPU flash kernel reads the strided rows in place, whereas two batched
matmuls over the same views made ``bmm`` copy K and V into contiguous tensors every layer (2-3x
slower at batch 8-32). T5 keeps the matmul form (``decode_attention``) for its additive
relative-position bias in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from common.engine import native

# Decode-sized inputs (rows <= this) use the oneDNN-prepacked copy of a bf16 weight.
PACKED_MAX_ROWS = 32

# A decode copy of a weight: the C kernel's layout, a oneDNN-prepacked tensor, or none.
DecodeWeight = native.PackedLinear | torch.Tensor | None


def pack_for_decode(weight: torch.Tensor, rows_hint: int = 1) -> DecodeWeight:
    """The C kernel's packed copy of a bf16 CPU weight when available, else ``pack_onednn``."""
    return native.pack_linear(weight) or pack_onednn(weight, rows_hint)


def pack_onednn(weight: torch.Tensor, rows_hint: int = 1) -> torch.Tensor | None:
    """oneDNN-prepacked copy of a bf16 CPU weight for small-row (decode) GEMMs, or None.

    Why: at one to a few rows per step, torch's default bf16 linear re-reads the plain weight
    through a generic path; the blocked layout chosen for that row count reads it up to ~1.8x
    faster here. Prefill keeps the plain weight (oneDNN handles large M well without it)."""
    if weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or weight.dim() != 2:
        return None
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows_hint)
    except (RuntimeError, AttributeError):
        return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed: DecodeWeight = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, through the decode copy for decode-sized inputs.

    Measured in the running engine (shared machine, CPU time per step, interleaved): at one
    row the packed oneDNN path beat torch's native bf16 gemv (oneDNN disabled for the call)
    by ~1.2x at 1 thread and tied at 2, although a bare-GEMM loop favoured the native one;
    the C kernel beats both (``native.py``). ``residual``: added to the (rounded) output."""
    if isinstance(packed, native.PackedLinear):
        if x.dim() == 2 and x.shape[0] <= native.MAX_ROWS:
            y = native.linear(x, packed, bias, residual=residual)
            if y is not None:
                return y
    if packed is not None and not isinstance(packed, native.PackedLinear) and x.dim() == 2 \
            and x.shape[0] <= PACKED_MAX_ROWS:
        y = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    else:
        y = F.linear(x, weight, bias)
    return y if residual is None else y.add_(residual)


def logits_linear(x: torch.Tensor, weight: torch.Tensor, packed: DecodeWeight) -> torch.Tensor:
    """LM-head logits; with the C kernel they are its float32 accumulators, never rounded to
    bf16 (bf16 logits near 25 are 0.125 apart: near-ties would become exact ties or flip),
    for any number of rows (chunks of ``native.MAX_ROWS``) so every batch gets the same
    numbers. Otherwise ``linear`` in the weight's dtype."""
    if isinstance(packed, native.PackedLinear) and x.dim() == 2 and x.shape[0] >= 1:
        chunks = [native.linear(part, packed, None, torch.float32)
                  for part in x.split(native.MAX_ROWS)]
        if all(c is not None for c in chunks):
            return torch.cat(chunks) if len(chunks) > 1 else chunks[0]  # type: ignore[arg-type]
    return linear(x, weight, None, packed)


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """[B, max_len] bool, True where position >= that sequence's length (to be masked)."""
    positions = torch.arange(max_len, device=lengths.device)
    return positions.unsqueeze(0) >= lengths.unsqueeze(1)


def mask_bias(pad_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [B, 1, 1, L] scores: 0 where attended, -inf where masked (once per pass)."""
    bias = torch.zeros(pad_mask.shape, dtype=dtype, device=pad_mask.device)
    return bias.masked_fill_(pad_mask, float("-inf")).view(pad_mask.shape[0], 1, 1, -1)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad_mask: torch.Tensor,
                     scale: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``grouped_decode_attention`` from a [B, L] pad mask (True = masked) and an optional
    additive [B or 1, Hq, L] score bias (T5 relative positions)."""
    num_q, num_kv = q.shape[1], k.shape[1]
    total = mask_bias(pad_mask, torch.float32 if bias is not None else q.dtype)
    if bias is not None:
        total = total + bias.float().view(bias.shape[0], num_kv, num_q // num_kv, -1)
    return grouped_decode_attention(q, k, v, total, scale)


def grouped_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """One query token per sequence against its cached keys, GQA heads grouped per KV head.

    q: [B, Hq, D]; k, v: [B, Hkv, L, D] (views of the cache, L = longest sequence);
    bias: additive scores broadcastable to [B, Hkv, G, L] (``mask_bias``, plus T5's relative
    position bias reshaped by the caller), or None when every sequence has length L (nothing
    to mask). Softmax runs in float32. Returns [B, Hq, D].
    """
    b, num_q, d = q.shape
    num_kv = k.shape[1]
    qg = q.view(b, num_kv, num_q // num_kv, d)
    scores = torch.matmul(qg, k.transpose(-1, -2))  # [B, Hkv, G, L]
    if bias is not None and bias.dtype != scores.dtype:
        scores = scores.float()
    if scale != 1.0:
        scores = scores.mul_(scale)
    if bias is not None:
        scores = scores.add_(bias)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.matmul(probs, v).view(b, num_q, d)


def sdpa_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """One query token per sequence against its cached keys, through SDPA.

    q: [B, Hq, D] (may be a strided view); k, v: [B, Hkv, L, D] views of the cache with unit
    stride over D (Hq a multiple of Hkv: GQA); bias: additive [B, 1, 1, L] in q's dtype
    (``mask_bias``) or None when every sequence has length L. Returns [B, Hq, D]."""
    b, num_q, d = q.shape
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=bias, scale=scale,
                                         enable_gqa=num_q != k.shape[1])
    return out.view(b, num_q, d)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      causal: bool = True) -> torch.Tensor:
    """Attention for one sequence's prompt. q: [Hq, T, D]; k, v: [Hkv, S, D] -> [Hq, T, D].

    The query positions are the last T of the S key positions (S > T when appending to a
    cached prefix)."""
    num_q, t, _ = q.shape
    s = k.shape[1]
    gqa = num_q != k.shape[0]  # SDPA groups the query heads itself: no repeated K/V copies
    if causal and s != t:
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal and t > 1, scale=scale,
                                          enable_gqa=gqa)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
