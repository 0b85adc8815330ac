"""T5 family (encoder-decoder): original T5 (ReLU FFN, tied embeddings) and v1.1 / Flan-T5
(gated-GELU FFN, separate LM head).

HF names: ``shared`` (the one token embedding of both stacks), ``{encoder,decoder}.block.{i}``
with ``layer.0.SelfAttention.{q,k,v,o}`` (+ ``relative_attention_bias`` in block 0),
``layer.0.layer_norm``; decoder blocks add ``layer.1.EncDecAttention.{q,k,v,o}`` and
``layer.1.layer_norm``; the FFN is the last sub-layer: ``DenseReluDense.{wi | wi_0, wi_1, wo}``
and its ``layer_norm``; ``{encoder,decoder}.final_layer_norm``; ``lm_head`` when untied.

Tying convention (``ModelConfig.tie_embeddings``): True means what it means in T5 itself, the
LM head is the token embedding AND the decoder output is scaled by ``d_model ** -0.5`` before
it. The LM head weight is ``lm_head.weight`` whenever the files hold it (transformers 5 writes
``tie_word_embeddings: true, scale_decoder_outputs: false`` for v1.1-style models and may still
store a separate head), else ``shared.weight``.

The stage itself lives in ``t5_stage.py``; the layers in ``t5_layers.py``.
"""

from __future__ import annotations

from typing import Any

import torch

from common.engine.tp import TPGroup
from common.models.config import ModelConfig
from common.models.t5_stage import T5Stage, decoder_start_token_id
from common.models.weights import WeightSource

__all__ = ["T5Stage", "build_stage", "config_from_hf", "decoder_start_token_id",
           "weight_shapes"]

_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh":
                "gelu_new", "silu": "silu", "swish": "silu"}


def _activation(hf: dict[str, Any]) -> tuple[str, bool]:
    """(activation, gated) from ``feed_forward_proj`` ("relu", "gated-gelu", ...)."""
    proj = str(hf.get("feed_forward_proj", "relu"))
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ValueError(f"unsupported T5 feed_forward_proj {proj!r} (expected ACT or gated-ACT)")
    gated = len(parts) == 2
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]
    if act not in _ACTIVATIONS:
        raise ValueError(f"unsupported T5 activation {act!r} in feed_forward_proj={proj!r}; "
                         f"supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[act], gated


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a transformers T5 ``config.json`` (v4 or v5 keys)."""
    activation, gated = _activation(hf)
    num_layers = hf.get("num_layers", 6)
    pad = hf.get("pad_token_id", 0)
    start = hf.get("decoder_start_token_id", pad)
    if start != pad:
        raise ValueError(f"T5 decoder_start_token_id={start} differs from pad_token_id={pad}; "
                         "only T5's convention (start with the pad token) is supported")
    # v5 stores the scaling switch separately; v4 ties scaling to tie_word_embeddings.
    scaled = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))
    return ModelConfig(
        family="t5", name=hf.get("_name_or_path", "") or "t5",
        vocab_size=hf.get("vocab_size", 32128), hidden_size=hf.get("d_model", 512),
        num_layers=hf.get("num_decoder_layers") or num_layers, num_encoder_layers=num_layers,
        num_heads=hf.get("num_heads", 8), head_dim=hf.get("d_kv", 64),
        ffn_size=hf.get("d_ff", 2048), max_position=hf.get("n_positions", 512),
        norm_eps=hf.get("layer_norm_epsilon", 1e-6), tie_embeddings=bool(scaled),
        activation=activation, gated_ffn=gated, eos_token_id=hf.get("eos_token_id", 1),
        pad_token_id=pad,
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
    )


def _block_shapes(cfg: ModelConfig, stack: str, index: int) -> dict[str, tuple[int, ...]]:
    h, inner, f = cfg.hidden_size, cfg.q_size, cfg.ffn_size
    p = f"{stack}.block.{index}.layer."
    attn = {"q": (inner, h), "k": (inner, h), "v": (inner, h), "o": (h, inner)}
    shapes = {f"{p}0.SelfAttention.{n}.weight": s for n, s in attn.items()}
    shapes[f"{p}0.layer_norm.weight"] = (h,)
    if index == 0:
        shapes[f"{p}0.SelfAttention.relative_attention_bias.weight"] = (
            cfg.relative_attention_num_buckets, cfg.num_heads)
    ffn = 1
    if stack == "decoder":
        shapes |= {f"{p}1.EncDecAttention.{n}.weight": s for n, s in attn.items()}
        shapes[f"{p}1.layer_norm.weight"] = (h,)
        ffn = 2
    ins = ("wi_0", "wi_1") if cfg.gated_ffn else ("wi",)
    shapes |= {f"{p}{ffn}.DenseReluDense.{n}.weight": (f, h) for n in ins}
    shapes[f"{p}{ffn}.DenseReluDense.wo.weight"] = (h, f)
    shapes[f"{p}{ffn}.layer_norm.weight"] = (h,)
    return shapes


def weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor of the model (random init and shape checks)."""
    h = cfg.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"shared.weight": (cfg.vocab_size, h),
                                          "encoder.final_layer_norm.weight": (h,),
                                          "decoder.final_layer_norm.weight": (h,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_encoder_layers):
        shapes |= _block_shapes(cfg, "encoder", i)
    for i in range(cfg.num_layers):
        shapes |= _block_shapes(cfg, "decoder", i)
    return shapes


def build_stage(cfg: ModelConfig, *, layer_range: tuple[int, int] | None = None,
                encoder_layer_range: tuple[int, int] | None = None, tp: TPGroup | None = None,
                device: torch.device | str = "cpu", dtype: torch.dtype | str = torch.float32,
                weights: WeightSource | None = None, seed: int = 0,
                cross_kv_only: bool = False) -> T5Stage:
    """One stage: encoder layers ``encoder_layer_range`` and decoder layers ``layer_range``
    (both default to the whole stack; pass ``(0, 0)`` for none) of one TP rank, loaded from
    ``weights`` or random weights deterministic in ``seed``. ``cross_kv_only``: hold only the
    decoder layers' cross-attention K/V projections (an encoder worker's stage)."""
    from common.models.decoder_only import resolve_dtype
    from common.models.weights import RandomWeights

    if cfg.family != "t5":
        raise ValueError(f"t5.build_stage got a {cfg.family!r} config")
    if encoder_layer_range is None and layer_range not in (None, (0, 0), (0, cfg.num_layers)):
        raise ValueError(
            f"a T5 stage with decoder layers {layer_range} needs an explicit "
            "encoder_layer_range: pipeline stages split both stacks (ExeGPT RRA: "
            "common.models.t5_pipeline.stage_ranges) and run through T5StagePipeline")
    stage = T5Stage(
        cfg, encoder_layer_range=encoder_layer_range or (0, cfg.num_encoder_layers),
        layer_range=layer_range or (0, cfg.num_layers), tp=tp or TPGroup.single(),
        dtype=resolve_dtype(dtype, device), device=torch.device(device),
        cross_kv_only=cross_kv_only)
    with torch.no_grad():
        stage.load(weights if weights is not None else RandomWeights(cfg, seed=seed))
    return stage.eval()
