"""Llama family (RMSNorm, RoPE, SwiGLU, grouped-query attention): Llama, SmolLM2, Mistral-style.

HF names: ``model.embed_tokens``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj``,
``model.layers.{i}.mlp.{gate,up,down}_proj``, ``{input,post_attention}_layernorm``,
``model.norm``, ``lm_head``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from common.models.config import ModelConfig
from common.models.decoder_only import Layout, build
from common.models.layers import DecoderLayer
from common.models.weights import WeightSource


@dataclass(frozen=True)
class LlamaLayout(Layout):
    def load_layer(self, layer: DecoderLayer, src: WeightSource, index: int) -> None:
        p = f"model.layers.{index}."
        attn = layer.attn
        attn.qkv.load(src, attn.qkv_specs(p + "self_attn.q_proj", p + "self_attn.k_proj",
                                          p + "self_attn.v_proj"))
        attn.o.load(src, attn.o_spec(p + "self_attn.o_proj"))
        layer.mlp.load(src, [p + "mlp.gate_proj", p + "mlp.up_proj"], p + "mlp.down_proj")
        layer.norm1.load(src, p + "input_layernorm")
        layer.norm2.load(src, p + "post_attention_layernorm")

    def layer_tensor_names(self, cfg: ModelConfig, index: int) -> list[str]:
        return [n for n in weight_shapes(cfg) if n.startswith(f"model.layers.{index}.")]


def layout(cfg: ModelConfig) -> LlamaLayout:
    return LlamaLayout(rms_norm=True, rope=True, gated=True, qkv_bias=cfg.attention_bias,
                       out_bias=cfg.attention_bias, mlp_bias=False,
                       embed="model.embed_tokens.weight", final_norm="model.norm",
                       lm_head="lm_head.weight")


def weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, q, kv, f = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.ffn_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h),
                                          "model.norm.weight": (h,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                   p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                   p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)}
        if cfg.attention_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,), p + "self_attn.o_proj.bias": (h,)}
    return shapes


def _rope_theta(hf: dict[str, Any]) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type not in (None, "default"):
        raise ValueError(f"unsupported RoPE scaling {rope_type!r}; only default RoPE is built")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported llama activation {hf['hidden_act']!r} (expected silu)")
    if hf.get("mlp_bias"):
        raise ValueError("llama configs with mlp_bias=true are not supported")
    heads = hf["num_attention_heads"]
    max_position = hf.get("max_position_embeddings", 2048)
    window = hf.get("sliding_window")
    if window:  # identical to full attention while sequences fit in the window
        max_position = min(max_position, window)
    return ModelConfig(
        family="llama", name=hf.get("_name_or_path", "") or "llama",
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        ffn_size=hf["intermediate_size"], max_position=max_position,
        norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=_rope_theta(hf),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), activation="silu",
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"), attention_bias=bool(hf.get("attention_bias")),
    )


def build_stage(cfg: ModelConfig, **kwargs: Any) -> nn.Module:
    return build(cfg, layout(cfg), **kwargs)
