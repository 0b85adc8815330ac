"""GPT-2 family (and GPT-3 shapes): pre-norm LayerNorm, learned positions, GELU(tanh) MLP.

HF names: ``transformer.{wte,wpe,ln_f}``, ``transformer.h.{i}.{ln_1,ln_2}``,
``transformer.h.{i}.attn.{c_attn,c_proj}``, ``transformer.h.{i}.mlp.{c_fc,c_proj}``. GPT-2's
Conv1D stores weights as [in, out] (transposed) and fuses Q, K, V in ``c_attn``; the shard specs
say so, so each rank still reads only its slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from common.models.config import ModelConfig
from common.models.decoder_only import Layout, build
from common.models.layers import DecoderLayer
from common.models.weights import WeightSource

PREFIX = "transformer."


@dataclass(frozen=True)
class GPT2Layout(Layout):
    def load_layer(self, layer: DecoderLayer, src: WeightSource, index: int) -> None:
        p = f"{PREFIX}h.{index}."
        attn = layer.attn
        fused = p + "attn.c_attn"
        hidden = attn.qkv.weight.shape[1]
        attn.qkv.load(src, attn.qkv_specs(fused, fused, fused, kv_offset=hidden,
                                          transposed=True))
        attn.o.load(src, attn.o_spec(p + "attn.c_proj", transposed=True))
        layer.mlp.load(src, [p + "mlp.c_fc"], p + "mlp.c_proj", transposed=True)
        layer.norm1.load(src, p + "ln_1")
        layer.norm2.load(src, p + "ln_2")

    def layer_tensor_names(self, cfg: ModelConfig, index: int) -> list[str]:
        return [n for n in weight_shapes(cfg) if n.startswith(f"{PREFIX}h.{index}.")]


def layout(cfg: ModelConfig) -> GPT2Layout:
    return GPT2Layout(rms_norm=False, rope=False, gated=False, qkv_bias=True, out_bias=True,
                      mlp_bias=True, embed=PREFIX + "wte.weight", final_norm=PREFIX + "ln_f",
                      lm_head="lm_head.weight", positions=PREFIX + "wpe.weight")


def weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, f = cfg.hidden_size, cfg.ffn_size
    shapes: dict[str, tuple[int, ...]] = {
        PREFIX + "wte.weight": (cfg.vocab_size, h), PREFIX + "wpe.weight": (cfg.max_position, h),
        PREFIX + "ln_f.weight": (h,), PREFIX + "ln_f.bias": (h,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"{PREFIX}h.{i}."
        shapes |= {p + "ln_1.weight": (h,), p + "ln_1.bias": (h,), p + "ln_2.weight": (h,),
                   p + "ln_2.bias": (h,), p + "attn.c_attn.weight": (h, 3 * h),
                   p + "attn.c_attn.bias": (3 * h,), p + "attn.c_proj.weight": (h, h),
                   p + "attn.c_proj.bias": (h,), p + "mlp.c_fc.weight": (h, f),
                   p + "mlp.c_fc.bias": (f,), p + "mlp.c_proj.weight": (f, h),
                   p + "mlp.c_proj.bias": (h,)}
    return shapes


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise ValueError("unsupported GPT-2 attention scaling (scale_attn_by_inverse_layer_idx "
                         "or scale_attn_weights=false)")
    if hf.get("add_cross_attention"):
        raise ValueError("GPT-2 with cross-attention is not supported")
    hidden, heads = hf["n_embd"], hf["n_head"]
    return ModelConfig(
        family="gpt2", name=hf.get("_name_or_path", "") or "gpt2", vocab_size=hf["vocab_size"],
        hidden_size=hidden, num_layers=hf["n_layer"], num_heads=heads,
        head_dim=hidden // heads, ffn_size=hf.get("n_inner") or 4 * hidden,
        max_position=hf.get("n_positions", 1024), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        activation=hf.get("activation_function", "gelu_new"),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )


class _Prefixed:
    """Old GPT-2 checkpoints omit the ``transformer.`` prefix; present them with it."""

    def __init__(self, inner: WeightSource) -> None:
        self.inner = inner

    def _strip(self, name: str) -> str:
        return name.removeprefix(PREFIX)

    def names(self) -> list[str]:
        return [n if n.startswith(PREFIX) or n == "lm_head.weight" else PREFIX + n
                for n in self.inner.names()]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.inner.shape(self._strip(name))

    def get(self, name: str, dim: int | None = None, start: int = 0,
            end: int | None = None) -> torch.Tensor:
        return self.inner.get(self._strip(name), dim, start, end)


def build_stage(cfg: ModelConfig, **kwargs: Any) -> nn.Module:
    weights = kwargs.get("weights")
    if weights is not None and PREFIX + "wte.weight" not in set(weights.names()) \
            and "wte.weight" in set(weights.names()):
        kwargs["weights"] = _Prefixed(weights)
    return build(cfg, layout(cfg), **kwargs)
