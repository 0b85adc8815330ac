"""T5's numerics, kept apart from the module plumbing so they can be checked one by one.

T5 differs from the other families in small ways that each change the output if missed:
- the layer norm only rescales (no mean subtraction, no bias) and accumulates in float32;
- attention scores are NOT scaled by 1/sqrt(head_dim) (the scale is folded into the init);
- positions enter only as a learned bias per (relative-position bucket, head), added to the
  attention scores; layer 0 of each stack owns the table and every layer reuses the bias;
- buckets are bidirectional in the encoder and causal (past only) in the decoder, half exact and
  half logarithmic up to ``max_distance``.
The bucket arithmetic repeats transformers' float32 operation order exactly: a bucket boundary
computed in another order could move a position into the neighbouring bucket.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def t5_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Scale-only layer norm; the variance is taken in float32 even for bf16 activations."""
    x32 = x.float()
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(weight.dtype)


def relative_position_bucket(
    relative_position: torch.Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """Bucket of ``key_position - query_position`` (long tensor of the same shape)."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).to(torch.long) * num_buckets
        distance = relative_position.abs()
    else:
        distance = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # clamp(min=1) only keeps log() finite on the positions the `is_small` branch takes anyway.
    scaled = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(
        max_distance / max_exact
    )
    if_large = max_exact + (scaled * (num_buckets - max_exact)).to(torch.long)
    if_large = torch.clamp(if_large, max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, if_large)


def encoder_position_bias(
    table: torch.Tensor, length: int, *, max_distance: int
) -> torch.Tensor:
    """Bias ``[1, heads, length, length]`` for a bidirectional stack; ``table`` is
    ``[num_buckets, heads]`` (this rank's heads only)."""
    positions = torch.arange(length, device=table.device)
    relative = positions[None, :] - positions[:, None]
    buckets = relative_position_bucket(
        relative, bidirectional=True, num_buckets=table.shape[0], max_distance=max_distance
    )
    return F.embedding(buckets, table).permute(2, 0, 1).unsqueeze(0)


def decoder_step_position_bias(
    table: torch.Tensor, query_positions: torch.Tensor, key_length: int, *, max_distance: int
) -> torch.Tensor:
    """Bias ``[batch, heads, key_length]`` for one new decoder token per sequence, where
    sequence ``i``'s token sits at ``query_positions[i]`` (keys past it are masked elsewhere)."""
    keys = torch.arange(key_length, device=table.device)
    relative = keys[None, :] - query_positions[:, None]
    buckets = relative_position_bucket(
        relative, bidirectional=False, num_buckets=table.shape[0], max_distance=max_distance
    )
    return F.embedding(buckets, table).permute(0, 2, 1)


def decoder_bias_by_distance(
    table: torch.Tensor, length: int, *, max_distance: int
) -> torch.Tensor:
    """Causal bias ``[length, heads]`` by distance ``query - key`` (0 .. length-1).

    Why: a decoder bucket depends only on that distance, so a stage computes this once and
    each decode step gathers from it (``decoder_step_bias_from``) instead of re-running the
    logarithmic bucket arithmetic over every ``[batch, key]`` pair; same numbers exactly."""
    distance = torch.arange(length, device=table.device)
    buckets = relative_position_bucket(
        -distance, bidirectional=False, num_buckets=table.shape[0], max_distance=max_distance
    )
    return F.embedding(buckets, table)


def decoder_step_bias_from(
    by_distance: torch.Tensor, query_positions: torch.Tensor, key_length: int
) -> torch.Tensor:
    """``decoder_step_position_bias`` from a ``decoder_bias_by_distance`` table holding at
    least ``max(query_positions) + 1`` distances: ``[batch, heads, key_length]``."""
    keys = torch.arange(key_length, device=by_distance.device)
    distance = (query_positions[:, None] - keys[None, :]).clamp_(min=0)
    return by_distance[distance].permute(0, 2, 1)


def activation_fn(name: str) -> torch.nn.Module:
    """The FFN nonlinearity by ModelConfig.activation name (gelu_new = tanh approximation)."""
    if name == "relu":
        return torch.nn.ReLU()
    if name == "gelu":
        return torch.nn.GELU()
    if name == "gelu_new":
        return torch.nn.GELU(approximate="tanh")
    if name == "silu":
        return torch.nn.SiLU()
    raise ValueError(f"T5 activation {name!r} is not supported (relu, gelu, gelu_new, silu)")
