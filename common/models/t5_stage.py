"""One pipeline stage of T5: an encoder-layer range and a decoder-layer range of one TP rank.

ExeGPT's RRA gives every stage E/N encoder layers and D/N decoder layers, so the encoder output
(needed by every decoder layer's cross-attention) only exists after the LAST encoder stage. The
encode pass therefore has up to two trips through the pipeline:

    trip 1  input_ids --embed--> x (stage holding encoder layer 0) | x = batch.hidden
            x --encoder layers--> x;  the stage holding the last encoder layer applies the
            final norm: x is now the encoder output, and from there on encode() returns it
            unchanged (a stage with decoder layers first writes its cross-attention K/V).
    trip 2  only for stages that hold decoder layers but came before the encoder end: the
            runner calls encode() again with ``extra["encoder_out"]`` (= batch.hidden); the
            stage skips its encoder layers and writes its cross K/V (``needs_encoder_out``).

A stage that holds the whole decoder (one stage, or the last stage of an encoder/decoder
split) also runs the first decoder step inside ``encode`` and returns its logits, like a
decoder-only prefill. Otherwise the runner follows the trips with a decode pass of the start
token (``decoder_start_token_id`` = pad, as in T5): ``common.models.t5_pipeline`` drives both.

Decode is one token per sequence through the decoder layers: the stage holding decoder layer 0
embeds the token ids, later stages take ``batch.hidden``; the stage holding the last decoder
layer returns logits.

An encoder worker (WAA) that only hands cross K/V to decoder workers builds its decoder range
with ``cross_kv_only``: just the EncDecAttention K/V projections, its exports carry
``cross_k``/``cross_v`` and an empty self-attention KV, and the decoder worker's first decode
step feeds the start token.

KV (``self.cache``): ``"k"``/``"v"`` self-attention (grows by one per decode step) and
``"cross_k"``/``"cross_v"`` (fixed: the encoder input length), for this stage's decoder layers
and this rank's heads; ``export_kv``/``import_kv`` move them as ``KVExport`` values.
"""

from __future__ import annotations

import torch
from torch import nn

from common.engine.batch import StageBatch
from common.engine.kernels import length_mask
from common.engine.kv_cache import FIXED, KVCache, KVExport
from common.engine.tp import ParallelLMHead, TPGroup, VocabParallelEmbedding, head_range
from common.models.config import ModelConfig
from common.models.decoder_only import ContextLengthError
from common.models.t5_layers import (
    CrossKV,
    DecodeContext,
    DecoderLayer,
    EncoderLayer,
    Shard,
    T5Norm,
)
from common.models.t5_math import (
    decoder_bias_by_distance,
    decoder_step_bias_from,
    encoder_position_bias,
)
from common.models.weights import WeightSource

BIAS = "block.0.layer.0.SelfAttention.relative_attention_bias.weight"


def decoder_start_token_id(cfg: ModelConfig) -> int:
    """T5 starts every decoder sequence with the pad token."""
    return cfg.pad_token_id if cfg.pad_token_id is not None else 0


def _check_range(name: str, rng: tuple[int, int], total: int) -> tuple[int, int]:
    first, last = rng
    if not 0 <= first <= last <= total:
        raise ValueError(f"{name} {rng} is not within [0, {total}]")
    return first, last


class T5Stage(nn.Module):
    def __init__(self, cfg: ModelConfig, *, encoder_layer_range: tuple[int, int],
                 layer_range: tuple[int, int], tp: TPGroup, dtype: torch.dtype,
                 device: torch.device, cross_kv_only: bool = False) -> None:
        super().__init__()
        e0, e1 = _check_range("encoder_layer_range", encoder_layer_range, cfg.num_encoder_layers)
        d0, d1 = _check_range("layer_range", layer_range, cfg.num_layers)
        if e0 == e1 and d0 == d1:
            raise ValueError("a T5 stage needs at least one encoder or decoder layer")
        self.cfg, self.tp, self.dtype, self.device = cfg, tp, dtype, device
        self.encoder_layer_range, self.layer_range = (e0, e1), (d0, d1)
        self.head_range = head_range(cfg.num_heads, tp)  # clear error if tp does not divide
        self.has_encoder, self.has_decoder = e1 > e0, d1 > d0
        # An encoder worker's stage: the decoder layers' cross K/V projections only.
        self.cross_kv_only = cross_kv_only and self.has_decoder
        full_decoder = self.has_decoder and not self.cross_kv_only
        self.embeds_encoder = self.has_encoder and e0 == 0
        self.embeds_decoder = full_decoder and d0 == 0
        self.encoder_end = self.has_encoder and e1 == cfg.num_encoder_layers
        self.is_first = (e0 == 0 or not self.has_encoder) and (d0 == 0 or not self.has_decoder)
        self.is_last = full_decoder and d1 == cfg.num_layers
        # Stages before the encoder end need the encoder output in a second trip.
        self.needs_encoder_out = self.has_decoder and self.has_encoder and not self.encoder_end
        shard = Shard(cfg, tp, self.head_range)
        self.encoder_layers = nn.ModuleList(
            EncoderLayer(cfg, shard, dtype, device) for _ in range(e0, e1))
        layer_type = CrossKV if self.cross_kv_only else DecoderLayer
        self.decoder_layers = nn.ModuleList(
            layer_type(cfg, i, shard, dtype, device) for i in range(d0, d1))
        self._build_ends(shard)
        # decoder position bias by distance (``_step_bias``): built at the first decode after
        # ``load``; the table is a Parameter written by ``load``, so load drops it
        self._bias_by_distance: torch.Tensor | None = None
        self.cache = KVCache(layer_start=d0, layer_end=d1, head_start=self.head_range[0],
                             head_end=self.head_range[1], num_kv_heads=cfg.num_heads,
                             head_dim=cfg.head_dim, dtype=dtype, device=device,
                             fixed_names=("cross_k", "cross_v")) if self.has_decoder else None

    def _build_ends(self, shard: Shard) -> None:
        cfg, args = self.cfg, (self.tp, self.dtype, self.device)
        needs_embed = self.embeds_encoder or self.embeds_decoder
        self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, *args) \
            if needs_embed else None
        table = (cfg.relative_attention_num_buckets, shard.num_heads)
        self.encoder_bias = nn.Parameter(torch.empty(table, dtype=self.dtype, device=self.device),
                                         requires_grad=False) if self.has_encoder else None
        self.decoder_bias = nn.Parameter(torch.empty(table, dtype=self.dtype, device=self.device),
                                         requires_grad=False) \
            if self.has_decoder and not self.cross_kv_only else None
        norm = (cfg.hidden_size, cfg.norm_eps, self.dtype, self.device)
        self.encoder_norm = T5Norm(*norm) if self.encoder_end else None
        self.decoder_norm = T5Norm(*norm) if self.is_last else None
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, *args) \
            if self.is_last else None

    # ---- loading -----------------------------------------------------------------------
    def _embed_name(self, names: set[str]) -> str:
        for name in ("shared.weight", "encoder.embed_tokens.weight",
                     "decoder.embed_tokens.weight"):
            if name in names:
                return name
        raise ValueError("the T5 token embedding (shared.weight) is missing from the weights")

    def _lm_head_name(self, names: set[str]) -> str:
        return "lm_head.weight" if "lm_head.weight" in names else self._embed_name(names)

    def needed_tensors(self, names: set[str]) -> list[str]:
        """HF names this stage reads (checked against the config's shapes before loading)."""
        from common.models.t5 import _block_shapes

        needed: list[str] = []
        for stack, (first, last) in (("encoder", self.encoder_layer_range),
                                     ("decoder", self.layer_range)):
            for i in range(first, last):
                names_i = list(_block_shapes(self.cfg, stack, i))
                if stack == "decoder" and self.cross_kv_only:
                    names_i = [n for n in names_i if ".EncDecAttention.k" in n
                               or ".EncDecAttention.v" in n]
                needed += names_i
            if last > first and (stack == "encoder" or self.decoder_bias is not None):
                needed.append(f"{stack}.{BIAS}")
        if self.embed is not None:
            needed.append(self._embed_name(names))
        if self.encoder_norm is not None:
            needed.append("encoder.final_layer_norm.weight")
        if self.is_last:
            needed += ["decoder.final_layer_norm.weight", self._lm_head_name(names)]
        return needed

    def load(self, src: WeightSource) -> None:
        from common.models.registry import check_shapes

        names = set(src.names())
        check_shapes(self.cfg, src, self.needed_tensors(names))
        for i, layer in zip(range(*self.encoder_layer_range), self.encoder_layers, strict=True):
            layer.load(src, f"encoder.block.{i}")
        for i, layer in zip(range(*self.layer_range), self.decoder_layers, strict=True):
            layer.load(src, f"decoder.block.{i}")
        h0, h1 = self.head_range
        self._bias_by_distance = None
        for stack, table in (("encoder", self.encoder_bias), ("decoder", self.decoder_bias)):
            if table is not None:
                table.copy_(src.get(f"{stack}.{BIAS}", dim=1, start=h0, end=h1))
        if self.embed is not None:
            self.embed.load(src, self._embed_name(names))
        if self.encoder_norm is not None:
            self.encoder_norm.load(src, "encoder.final_layer_norm.weight")
        if self.decoder_norm is not None and self.lm_head is not None:
            self.decoder_norm.load(src, "decoder.final_layer_norm.weight")
            self.lm_head.load(src, self._lm_head_name(names))

    # ---- encode ------------------------------------------------------------------------
    @property
    def encode_gives_logits(self) -> bool:
        """True when this stage holds the whole decoder: its encode then also runs the first
        decoder step (the start token) and returns that step's logits [num_seqs, vocab]."""
        return self.is_last and self.layer_range[0] == 0

    @torch.inference_mode()
    def encode(self, batch: StageBatch) -> torch.Tensor:
        """Encoder layers and/or cross K/V (see the module docstring for the two trips).
        Returns hidden [T, d] (encoder unfinished), the encoder output [T, d], or, when
        ``encode_gives_logits``, the logits of the first generated token."""
        self._check_context(batch.req_ids, batch.seq_lens, "encoder input")
        encoder_out = batch.extra.get("encoder_out")
        if encoder_out is None and self.has_encoder:
            x = self._run_encoder(batch)
            if not self.encoder_end:
                return x
            encoder_out = x
        elif encoder_out is None:
            if batch.hidden is None:
                raise ValueError("a T5 stage without encoder layers takes the encoder output "
                                 "as batch.hidden")
            encoder_out = batch.hidden
        encoder_out = encoder_out.to(self.dtype)
        if not self.has_decoder:
            return encoder_out
        self._write_cross(batch, encoder_out)
        if not self.encode_gives_logits:
            return encoder_out
        start = [decoder_start_token_id(self.cfg)] * batch.num_seqs
        return self.decode(StageBatch.from_tokens(batch.req_ids, start, self.device))

    def _run_encoder(self, batch: StageBatch) -> torch.Tensor:
        if self.embeds_encoder:
            if batch.input_ids is None or self.embed is None:
                raise ValueError("the stage holding encoder layer 0 takes input_ids")
            x = self.embed(batch.input_ids)
        elif batch.hidden is None:
            raise ValueError("a later encoder stage takes the previous stage's hidden states")
        else:
            x = batch.hidden.to(self.dtype)
        assert self.encoder_bias is not None
        bias = encoder_position_bias(self.encoder_bias, max(batch.seq_lens),
                                     max_distance=self.cfg.relative_attention_max_distance)
        for layer in self.encoder_layers:
            x = layer(x, batch.seq_lens, bias)
        return self.encoder_norm(x) if self.encoder_norm is not None else x

    def _write_cross(self, batch: StageBatch, encoder_out: torch.Tensor) -> None:
        cache = self._cache()
        again = [r for r in batch.req_ids if r in cache]
        if again:
            raise ValueError(f"requests {again} are already encoded on this stage; free them "
                             "first")
        for r, n in zip(batch.req_ids, batch.seq_lens, strict=True):
            cache.add(r)
            cache.set_length(r, n, FIXED)
        slots = [cache.slot(r) for r in batch.req_ids]
        for layer in self.decoder_layers:
            layer.write_cross(cache, slots, batch.seq_lens, encoder_out)

    # ---- decode ------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, batch: StageBatch) -> torch.Tensor:
        """One decoder token per sequence; returns hidden [B, d] or logits [B, vocab]."""
        if any(n != 1 for n in batch.seq_lens):
            raise ValueError("decode takes exactly one token per sequence")
        if self.cross_kv_only:
            raise ValueError("a cross_kv_only T5 stage only encodes; decode on a stage built "
                             "with the full decoder layers")
        cache = self._cache()
        ctx = self._decode_context(cache, batch.req_ids)
        self._check_context(batch.req_ids, (ctx.self_batch.lengths + 1).tolist(),
                            "decoder sequence")
        if self.embeds_decoder:
            if batch.input_ids is None or self.embed is None:
                raise ValueError("the stage holding decoder layer 0 takes input_ids")
            x = self.embed(batch.input_ids)
        elif batch.hidden is None:
            raise ValueError("a later decoder stage takes the previous stage's hidden states")
        else:
            x = batch.hidden.to(self.dtype)
        for layer in self.decoder_layers:
            x = layer(x, ctx)
        cache.advance(batch.req_ids)
        return self._logits(x) if self.is_last else x

    def _decode_context(self, cache: KVCache, req_ids: list[str]) -> DecodeContext:
        self_batch = cache.batch(req_ids)
        cross_batch = cache.batch(req_ids, FIXED)
        bias = self._step_bias(self_batch.lengths, self_batch.max_len + 1)
        return DecodeContext(
            cache=cache, self_batch=self_batch, cross_batch=cross_batch,
            self_mask=length_mask(self_batch.lengths + 1, self_batch.max_len + 1),
            cross_mask=length_mask(cross_batch.lengths, cross_batch.max_len), bias=bias)

    def _step_bias(self, positions: torch.Tensor, key_length: int) -> torch.Tensor:
        """``[B, heads, key_length]`` relative-position bias of this step's tokens, gathered
        from the per-distance table (grown to cover ``key_length`` distances when needed):
        the bucket arithmetic runs once per stage, not over [B, L] at every step."""
        assert self.decoder_bias is not None
        table = self._bias_by_distance
        if table is None or table.shape[0] < key_length:
            length = max(key_length, self.cfg.max_position + 1)
            table = self._bias_by_distance = decoder_bias_by_distance(
                self.decoder_bias, length, max_distance=self.cfg.relative_attention_max_distance)
        return decoder_step_bias_from(table, positions, key_length)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        assert self.decoder_norm is not None and self.lm_head is not None
        x = self.decoder_norm(x)
        if self.cfg.tie_embeddings:
            x = x * self.cfg.hidden_size ** -0.5
        return self.lm_head(x).float()

    def _check_context(self, req_ids: list[str], lengths: list[int], what: str) -> None:
        for r, n in zip(req_ids, lengths, strict=True):
            if n > self.cfg.max_position:
                raise ContextLengthError(
                    f"request {r!r}: {what} of {n} tokens exceeds the model's context of "
                    f"{self.cfg.max_position}; shorten the input or max_new_tokens")

    # ---- cache management (what workers call between passes) -----------------------------
    def _cache(self) -> KVCache:
        if self.cache is None:
            raise ValueError("this T5 stage holds no decoder layers, so it keeps no KV cache")
        return self.cache

    def free(self, req_id: str) -> None:
        if self.cache is not None:
            self.cache.free(req_id)

    def compact(self) -> None:
        if self.cache is not None:
            self.cache.compact()

    def export_kv(self, req_id: str, layers: tuple[int, int] | None = None,
                  kv_heads: tuple[int, int] | None = None) -> KVExport:
        """"k"/"v" (self, seq_len decoder tokens) and "cross_k"/"cross_v" (encoder length)."""
        return self._cache().export(req_id, layers, kv_heads)

    def import_kv(self, exp: KVExport) -> None:
        self._cache().import_(exp)
