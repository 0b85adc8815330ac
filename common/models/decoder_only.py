"""One pipeline stage of a decoder-only model (llama, OPT, GPT-2): layers [first, last) of one
TP rank, with the embeddings on the first stage and the final norm + LM head on the last.

Data flow of a pass (``encode`` = prefill of packed ragged prompts, ``decode`` = one token per
sequence):

    input_ids --embed--> x (first stage) | x = batch.hidden (later stages)
    x --layers (KV written to / read from self.cache)--> x
    last stage: x[last row of each sequence] --norm--> --lm_head--> logits [num_seqs, vocab]
    other stages: return x for the next stage

A family provides a ``Layout`` (norm kind, RoPE or learned positions, biases, HF tensor names).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from common.engine.batch import StageBatch
from common.engine.kv_cache import SELF, KVCache
from common.engine.tp import ParallelLMHead, TPGroup, VocabParallelEmbedding, kv_head_range
from common.models.config import ModelConfig
from common.models.layers import (
    MLP,
    Attention,
    DecoderLayer,
    Norm,
    PassContext,
    Rope,
    decode_bias,
    native_attend_lengths,
)
from common.models.weights import WeightSource


class ContextLengthError(ValueError):
    """A sequence would exceed the model's maximum position."""


@dataclass(frozen=True)
class Layout:
    """How a family differs: block options and the HF names of its non-layer tensors."""

    rms_norm: bool
    rope: bool
    gated: bool
    qkv_bias: bool
    out_bias: bool
    mlp_bias: bool
    embed: str
    final_norm: str
    lm_head: str
    positions: str | None = None
    position_offset: int = 0

    def load_layer(self, layer: DecoderLayer, src: WeightSource, index: int) -> None:
        raise NotImplementedError

    def layer_tensor_names(self, cfg: ModelConfig, index: int) -> list[str]:
        raise NotImplementedError


def resolve_dtype(dtype: torch.dtype | str, device: torch.device | str) -> torch.dtype:
    """Accept "float32"/"bfloat16"/"float16" or a torch dtype; refuse fp16 on the CPU."""
    resolved = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"unsupported dtype {dtype!r}; use float32 or bfloat16 (CPU), "
                         "float16/bfloat16 (CUDA)")
    if resolved == torch.float16 and torch.device(device).type == "cpu":
        raise ValueError("float16 is unusably slow on the CPU (~1 GFLOP/s); use bfloat16")
    return resolved


class DecoderOnlyStage(nn.Module):
    def __init__(self, cfg: ModelConfig, layout: Layout, layer_range: tuple[int, int],
                 tp: TPGroup, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        first, last = layer_range
        if not 0 <= first < last <= cfg.num_layers:
            raise ValueError(f"layer_range {layer_range} is not within [0, {cfg.num_layers}]")
        self.cfg, self.layout, self.tp = cfg, layout, tp
        self.layer_range, self.dtype, self.device = (first, last), dtype, torch.device(device)
        self.is_first, self.is_last = first == 0, last == cfg.num_layers
        self.layers = nn.ModuleList(self._layer(i) for i in range(first, last))
        self._build_ends()
        self.rope = Rope(cfg.head_dim, cfg.rope_theta, cfg.max_position, device) \
            if layout.rope else None
        h0, h1 = kv_head_range(cfg.kv_heads, cfg.num_heads, tp)
        self.cache = KVCache(layer_start=first, layer_end=last, head_start=h0, head_end=h1,
                             num_kv_heads=cfg.kv_heads, head_dim=cfg.head_dim, dtype=dtype,
                             device=device, transposed_names=())  # SDPA reads [L, D] rows

    def _layer(self, index: int) -> DecoderLayer:
        cfg, lay, args = self.cfg, self.layout, (self.tp, self.dtype, self.device)
        return DecoderLayer(
            Attention(cfg, index, lay.qkv_bias, lay.out_bias, *args),
            MLP(cfg, lay.gated, lay.mlp_bias, *args),
            Norm(cfg.hidden_size, cfg.norm_eps, lay.rms_norm, self.dtype, self.device),
            Norm(cfg.hidden_size, cfg.norm_eps, lay.rms_norm, self.dtype, self.device))

    def _build_ends(self) -> None:
        cfg, args = self.cfg, (self.tp, self.dtype, self.device)
        self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, *args) \
            if self.is_first else None
        self.pos_embed = None
        if self.is_first and self.layout.positions is not None:
            rows = cfg.max_position + self.layout.position_offset
            self.pos_embed = nn.Embedding(rows, cfg.hidden_size, dtype=self.dtype,
                                          device=self.device).requires_grad_(False)
        self.norm = Norm(cfg.hidden_size, cfg.norm_eps, self.layout.rms_norm, self.dtype,
                         self.device) if self.is_last else None
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, *args) \
            if self.is_last else None

    # ---- loading -----------------------------------------------------------------------
    def needed_tensors(self) -> list[str]:
        lay, names = self.layout, []
        if self.is_first:
            names += [lay.embed] + ([lay.positions] if lay.positions else [])
        for i in range(*self.layer_range):
            names += lay.layer_tensor_names(self.cfg, i)
        if self.is_last:
            names += [lay.final_norm + ".weight"]
            names += [] if lay.rms_norm else [lay.final_norm + ".bias"]
            names += [lay.embed if self.cfg.tie_embeddings else lay.lm_head]
        return names

    def load(self, src: WeightSource) -> None:
        from common.models.registry import check_shapes

        check_shapes(self.cfg, src, self.needed_tensors())
        lay = self.layout
        if self.embed is not None:
            self.embed.load(src, lay.embed)
        if self.pos_embed is not None and lay.positions is not None:
            self.pos_embed.weight.copy_(src.get(lay.positions))
        for i, layer in zip(range(*self.layer_range), self.layers, strict=True):
            lay.load_layer(layer, src, i)
        if self.norm is not None and self.lm_head is not None:
            self.norm.load(src, lay.final_norm)
            self.lm_head.load(src, lay.embed if self.cfg.tie_embeddings else lay.lm_head)

    # ---- passes ------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, batch: StageBatch) -> torch.Tensor:
        """Prefill: writes the prompts' KV; returns hidden [T, H] or logits [num_seqs, V]."""
        for r in batch.req_ids:
            if r not in self.cache:
                self.cache.add(r)
        starts = [self.cache.seq_len(r) for r in batch.req_ids]
        ends = [s + n for s, n in zip(starts, batch.seq_lens, strict=True)]
        self._check_context(batch.req_ids, ends)
        # Grow the buffers once, with room for the first decode append, so neither the
        # per-sequence writes nor the first decode step reallocate the cache.
        self.cache.reserve(SELF, max(ends) + 1)
        positions = torch.cat([torch.arange(s, s + n) for s, n in
                               zip(starts, batch.seq_lens, strict=True)]).to(self.device)
        ctx = PassContext(cache=self.cache, req_ids=batch.req_ids,
                          slots=[self.cache.slot(r) for r in batch.req_ids], starts=starts,
                          seq_lens=batch.seq_lens, positions=positions)
        x = self._run(batch, ctx)
        for r, s, n in zip(batch.req_ids, starts, batch.seq_lens, strict=True):
            self.cache.set_length(r, s + n)
        if not self.is_last:
            return x
        last_rows = torch.tensor(batch.seq_lens, device=self.device).cumsum(0) - 1
        return self._logits(x[last_rows])

    @torch.inference_mode()
    def decode(self, batch: StageBatch) -> torch.Tensor:
        """One token per sequence; returns hidden [B, H] or logits [B, V]."""
        if any(n != 1 for n in batch.seq_lens):
            raise ValueError("decode takes exactly one token per sequence")
        cache_batch = self.cache.batch(batch.req_ids)
        self._check_context(batch.req_ids, (cache_batch.lengths + 1).tolist())
        ctx = PassContext(cache=self.cache, req_ids=batch.req_ids, slots=[], starts=[],
                          seq_lens=batch.seq_lens, positions=cache_batch.lengths,
                          batch=cache_batch, score_bias=decode_bias(cache_batch, self.dtype),
                          attend_lengths=native_attend_lengths(cache_batch, self.dtype))
        x = self._run(batch, ctx)
        logits = self._logits(x) if self.is_last else x
        self.cache.advance(batch.req_ids)
        return logits

    def _run(self, batch: StageBatch, ctx: PassContext) -> torch.Tensor:
        if self.rope is not None:
            cos, sin = self.rope.tables(ctx.positions, self.dtype)
            ctx.rope = cos.unsqueeze(1), sin.unsqueeze(1)
        x = self._embed(batch.input_ids, ctx.positions) if self.is_first else batch.hidden
        if x is None:
            raise ValueError("a first stage needs input_ids; later stages need hidden")
        x = x.to(self.dtype)
        if ctx.is_decode and ctx.attend_lengths is not None:
            ctx.fused = self.layers[0].step_plan(ctx)
        for layer in self.layers:
            x = layer(x, ctx)
        return x

    def _embed(self, ids: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
        if ids is None or self.embed is None:
            raise ValueError("the first stage needs input_ids")
        x = self.embed(ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions + self.layout.position_offset)
        return x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        assert self.norm is not None and self.lm_head is not None
        return self.lm_head(self.norm(x)).float()

    def _check_context(self, req_ids: list[str], lengths: list[int]) -> None:
        for r, n in zip(req_ids, lengths, strict=True):
            if n > self.cfg.max_position:
                raise ContextLengthError(
                    f"request {r!r} needs {n} positions but the model's context is "
                    f"{self.cfg.max_position} tokens; shorten the prompt or max_new_tokens")

    # ---- cache management (what workers call between passes) -----------------------------
    def free(self, req_id: str) -> None:
        self.cache.free(req_id)

    def compact(self) -> None:
        self.cache.compact()


def build(cfg: ModelConfig, layout: Layout, *, layer_range: tuple[int, int] | None = None,
          encoder_layer_range: tuple[int, int] | None = None, tp: TPGroup | None = None,
          device: torch.device | str = "cpu", dtype: torch.dtype | str = torch.float32,
          weights: WeightSource | None = None, seed: int = 0,
          pack_weights: bool = True) -> DecoderOnlyStage:
    """Build and load one stage; random weights (deterministic in ``seed``) when none given.

    ``pack_weights``: keep a oneDNN-prepacked copy of each bf16 CPU weight for decode GEMMs
    (faster decode for about twice the linear-weight memory; a no-op for other dtypes)."""
    from common.models.weights import RandomWeights

    if encoder_layer_range not in (None, (0, 0)):
        raise ValueError(f"{cfg.family} is decoder-only: encoder_layer_range must be None")
    resolved = resolve_dtype(dtype, device)
    stage = DecoderOnlyStage(cfg, layout, layer_range or (0, cfg.num_layers),
                             tp or TPGroup.single(), resolved, device)
    with torch.no_grad():
        stage.load(weights if weights is not None else RandomWeights(cfg, seed=seed))
    if pack_weights:
        for module in stage.modules():
            if hasattr(module, "pack_for_decode"):
                module.pack_for_decode()
    return stage.eval()
