"""OPT family (pre-norm LayerNorm, learned positions offset by 2, ReLU MLP, biases everywhere).

HF names: ``model.decoder.embed_tokens``, ``model.decoder.embed_positions``,
``model.decoder.layers.{i}.self_attn.{q,k,v,out}_proj``, ``self_attn_layer_norm``, ``fc1``,
``fc2``, ``final_layer_norm``; ``model.decoder.final_layer_norm``; ``lm_head`` (tied).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from common.models.config import ModelConfig
from common.models.decoder_only import Layout, build
from common.models.layers import DecoderLayer
from common.models.weights import WeightSource

POSITION_OFFSET = 2  # OPT's learned position table starts at row 2
PREFIX = "model.decoder."


@dataclass(frozen=True)
class OPTLayout(Layout):
    def load_layer(self, layer: DecoderLayer, src: WeightSource, index: int) -> None:
        p = f"{PREFIX}layers.{index}."
        attn = layer.attn
        attn.qkv.load(src, attn.qkv_specs(p + "self_attn.q_proj", p + "self_attn.k_proj",
                                          p + "self_attn.v_proj"))
        attn.o.load(src, attn.o_spec(p + "self_attn.out_proj"))
        layer.mlp.load(src, [p + "fc1"], p + "fc2")
        layer.norm1.load(src, p + "self_attn_layer_norm")
        layer.norm2.load(src, p + "final_layer_norm")

    def layer_tensor_names(self, cfg: ModelConfig, index: int) -> list[str]:
        return [n for n in weight_shapes(cfg) if n.startswith(f"{PREFIX}layers.{index}.")]


def layout(cfg: ModelConfig) -> OPTLayout:
    return OPTLayout(rms_norm=False, rope=False, gated=False, qkv_bias=True, out_bias=True,
                     mlp_bias=True, embed=PREFIX + "embed_tokens.weight",
                     final_norm=PREFIX + "final_layer_norm", lm_head="lm_head.weight",
                     positions=PREFIX + "embed_positions.weight",
                     position_offset=POSITION_OFFSET)


def weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, f = cfg.hidden_size, cfg.ffn_size
    shapes: dict[str, tuple[int, ...]] = {
        PREFIX + "embed_tokens.weight": (cfg.vocab_size, h),
        PREFIX + "embed_positions.weight": (cfg.max_position + POSITION_OFFSET, h),
        PREFIX + "final_layer_norm.weight": (h,), PREFIX + "final_layer_norm.bias": (h,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"{PREFIX}layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes |= {f"{p}self_attn.{proj}.weight": (h, h), f"{p}self_attn.{proj}.bias": (h,)}
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            shapes |= {f"{p}{norm}.weight": (h,), f"{p}{norm}.bias": (h,)}
        shapes |= {p + "fc1.weight": (f, h), p + "fc1.bias": (f,), p + "fc2.weight": (h, f),
                   p + "fc2.bias": (h,)}
    return shapes


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    hidden = hf["hidden_size"]
    unsupported = {
        "do_layer_norm_before=false (OPT-350m post-norm)": not hf.get("do_layer_norm_before",
                                                                      True),
        "word_embed_proj_dim != hidden_size": hf.get("word_embed_proj_dim", hidden) != hidden,
        "enable_bias=false": not hf.get("enable_bias", True),
        "layer_norm_elementwise_affine=false": not hf.get("layer_norm_elementwise_affine", True),
        "_remove_final_layer_norm=true": hf.get("_remove_final_layer_norm", False),
    }
    bad = [what for what, flag in unsupported.items() if flag]
    if bad:
        raise ValueError(f"unsupported OPT options: {', '.join(bad)}")
    heads = hf["num_attention_heads"]
    return ModelConfig(
        family="opt", name=hf.get("_name_or_path", "") or "opt", vocab_size=hf["vocab_size"],
        hidden_size=hidden, num_layers=hf["num_hidden_layers"], num_heads=heads,
        head_dim=hidden // heads, ffn_size=hf["ffn_dim"],
        max_position=hf.get("max_position_embeddings", 2048), norm_eps=1e-5,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        activation=hf.get("activation_function", "relu"), bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"),
    )


def build_stage(cfg: ModelConfig, **kwargs: Any) -> nn.Module:
    return build(cfg, layout(cfg), **kwargs)
