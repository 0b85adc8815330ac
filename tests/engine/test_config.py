"""ModelConfig: presets, planner helpers checked against transformers' own parameter counts."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from common.models.config import ModelConfig
from common.models.registry import family_module
from common.models.weights import RandomWeights


def test_config_imports_without_torch() -> None:
    code = ("import sys, common.models.config as c; c.ModelConfig.preset('gpt3-175b'); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def _hf_param_count(cfg: ModelConfig) -> int:
    import transformers as tf

    if cfg.family == "llama":
        hf = tf.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                            num_key_value_heads=cfg.kv_heads, intermediate_size=cfg.ffn_size,
                            head_dim=cfg.head_dim, tie_word_embeddings=cfg.tie_embeddings)
        cls = tf.LlamaForCausalLM
    elif cfg.family == "opt":
        hf = tf.OPTConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                          num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                          ffn_dim=cfg.ffn_size, max_position_embeddings=cfg.max_position,
                          word_embed_proj_dim=cfg.hidden_size)
        cls = tf.OPTForCausalLM
    else:
        hf = tf.GPT2Config(vocab_size=cfg.vocab_size, n_embd=cfg.hidden_size,
                           n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.ffn_size,
                           n_positions=cfg.max_position)
        cls = tf.GPT2LMHeadModel
    with torch.device("meta"):
        model = cls(hf)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["smollm2-135m", "opt-13b", "gpt3-39b", "tiny-llama",
                                  "tiny-opt", "tiny-gpt2"])
def test_param_counts_match_transformers(name: str) -> None:
    cfg = ModelConfig.preset(name)
    assert cfg.total_params() == _hf_param_count(cfg)


def test_paper_shapes() -> None:
    shapes = {n: (ModelConfig.preset(n).num_layers, ModelConfig.preset(n).hidden_size,
                  ModelConfig.preset(n).num_heads)
              for n in ("opt-13b", "gpt3-39b", "gpt3-101b", "gpt3-175b", "gpt3-341b")}
    assert shapes == {"opt-13b": (40, 5120, 40), "gpt3-39b": (48, 8192, 64),
                      "gpt3-101b": (80, 10240, 80), "gpt3-175b": (96, 12288, 96),
                      "gpt3-341b": (120, 15360, 120)}
    t5 = ModelConfig.preset("t5-11b")
    assert (t5.num_encoder_layers + t5.num_layers, t5.hidden_size, t5.num_heads) == (48, 1024, 128)
    assert round(ModelConfig.preset("gpt3-175b").total_params() / 1e9) == 175


def test_planner_helpers() -> None:
    cfg = ModelConfig.preset("smollm2-135m")
    assert cfg.kv_bytes_per_token_per_layer(2) == 2 * 3 * 64 * 2
    per_layer = cfg.param_bytes_per_layer("decoder", 2)
    assert per_layer == 2 * sum(s[0] * (s[1] if len(s) > 1 else 1) for n, s in
                                family_module("llama").weight_shapes(cfg).items()
                                if n.startswith("model.layers.0."))
    assert cfg.flops_per_token_per_layer("decoder", 100) > cfg.flops_per_token_per_layer()
    with pytest.raises(ValueError, match="no encoder"):
        cfg.param_bytes_per_layer("encoder")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_validation() -> None:
    with pytest.raises(ValueError, match="unknown model family"):
        ModelConfig.preset("tiny-llama").with_(family="bert")
    with pytest.raises(ValueError, match="positive int"):
        ModelConfig.preset("tiny-llama").with_(hidden_size=0)
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.preset("nope")


def test_random_weights_slices_agree_with_the_whole() -> None:
    cfg = ModelConfig.preset("tiny-gpt2").with_(ffn_size=600)
    w = RandomWeights(cfg, seed=3)
    name = "transformer.h.1.mlp.c_fc.weight"  # [64, 600]
    full = w.get(name)
    assert torch.equal(w.get(name, 1, 250, 520), full[:, 250:520])
    name = "transformer.h.1.mlp.c_proj.weight"  # [600, 64]: row blocks of 256
    full = w.get(name)
    assert torch.equal(w.get(name, 0, 250, 520), full[250:520])
    assert torch.equal(RandomWeights(cfg, seed=3).get(name), full)
    assert not torch.equal(RandomWeights(cfg, seed=4).get(name), full)
