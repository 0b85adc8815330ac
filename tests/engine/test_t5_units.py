"""T5 pieces checked on their own: bucket arithmetic, config mapping, shard shapes, errors."""

from __future__ import annotations

import pytest
import torch

from common.engine.tp import TPGroup
from common.models.config import ModelConfig
from common.models.t5 import build_stage, config_from_hf, weight_shapes
from common.models.t5_math import (
    decoder_step_position_bias,
    relative_position_bucket,
)
from common.models.weights import RandomWeights

torch.set_num_threads(1)


def _fake_tp(tp_size: int, tp_rank: int) -> TPGroup:
    """A TP rank that is built and loaded but never runs a collective."""
    return TPGroup(tp_size=tp_size, tp_rank=tp_rank, group=object())


def test_buckets_match_transformers() -> None:
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-3000, 3000)
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 20), (64, 200), (8, 32)):
            ref = T5Attention._relative_position_bucket(rel, bidirectional, buckets, distance)
            ours = relative_position_bucket(rel, bidirectional=bidirectional,
                                            num_buckets=buckets, max_distance=distance)
            assert torch.equal(ours, ref)


def test_decode_step_bias_table_matches_per_step_buckets() -> None:
    """The stage's per-distance bias table gives, for ragged positions past max_distance and
    a table grown mid-run, exactly the bias of the per-step bucket arithmetic."""
    cfg = ModelConfig.preset("tiny-t5")
    stage = build_stage(cfg, weights=RandomWeights(cfg, seed=3), layer_range=(0, cfg.num_layers))
    assert stage.decoder_bias is not None
    table = stage.decoder_bias
    for key_length in (1, 2, 9, 40, cfg.max_position, cfg.max_position + 70):
        positions = torch.randint(0, key_length, (6,))
        positions[0] = key_length - 1
        want = decoder_step_position_bias(
            table, positions, key_length, max_distance=cfg.relative_attention_max_distance)
        got = stage._step_bias(positions, key_length)
        assert got.shape == (6, cfg.num_heads, key_length)
        assert torch.equal(got, want)


def test_config_from_hf_original_and_v1_1() -> None:
    from transformers import T5Config

    original = config_from_hf(T5Config(num_layers=3, num_heads=4).to_dict())
    assert (original.activation, original.gated_ffn, original.tie_embeddings) == ("relu", False,
                                                                                  True)
    assert (original.num_encoder_layers, original.num_layers) == (3, 3)
    v11 = config_from_hf(T5Config(feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                  num_layers=4, num_decoder_layers=2).to_dict())
    assert (v11.activation, v11.gated_ffn, v11.tie_embeddings) == ("gelu_new", True, False)
    assert (v11.num_encoder_layers, v11.num_layers, v11.pad_token_id) == (4, 2, 0)
    # a transformers 4 config.json of a v1.1 checkpoint: no scale_decoder_outputs key
    legacy = config_from_hf({"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False})
    assert legacy.tie_embeddings is False


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="feed_forward_proj"):
        config_from_hf({"feed_forward_proj": "fancy-gelu"})
    with pytest.raises(ValueError, match="activation"):
        config_from_hf({"feed_forward_proj": "gated-tanh"})
    with pytest.raises(ValueError, match="decoder_start_token_id"):
        config_from_hf({"decoder_start_token_id": 5, "pad_token_id": 0})


def test_bad_tp_and_ranges() -> None:
    cfg = ModelConfig.preset("tiny-t5")
    with pytest.raises(ValueError, match="does not divide num_heads=4"):
        build_stage(cfg, tp=_fake_tp(3, 0))
    with pytest.raises(ValueError, match="layer_range"):
        build_stage(cfg, layer_range=(1, 5))
    with pytest.raises(ValueError, match="at least one encoder or decoder layer"):
        build_stage(cfg, layer_range=(0, 0), encoder_layer_range=(1, 1))


def test_missing_and_mismatched_weights() -> None:
    cfg = ModelConfig.preset("tiny-t5")

    class Missing(RandomWeights):
        def names(self) -> list[str]:
            return [n for n in super().names() if "EncDecAttention.k" not in n]

    with pytest.raises(ValueError, match="EncDecAttention.k.weight.*missing"):
        build_stage(cfg, weights=Missing(cfg))
    with pytest.raises(ValueError, match="shape"):
        build_stage(cfg, weights=RandomWeights(cfg.with_(ffn_size=96)))


def test_t5_11b_stage_shards() -> None:
    """The paper's T5-11B: rank 3 of tp 8 holding encoder layer 5 and decoder layer 7's cross
    K/V reads only its slice of each tensor (16 of 128 heads, 1/8 of the FFN)."""
    cfg = ModelConfig.preset("t5-11b")
    shapes = weight_shapes(cfg)
    assert shapes["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] == (
        32, 128)
    assert sum(torch.Size(s).numel() for s in shapes.values()) == cfg.total_params()
    stage = build_stage(cfg, encoder_layer_range=(5, 6), layer_range=(7, 8), tp=_fake_tp(8, 3),
                        dtype="bfloat16", cross_kv_only=True)
    enc, dec = stage.encoder_layers[0], stage.decoder_layers[0]
    assert tuple(enc.attn.qkv.weight.shape) == (3 * 16 * 128, 1024)
    assert tuple(enc.ffn.wo.weight.shape) == (1024, 65536 // 8)
    assert tuple(dec.kv.weight.shape) == (2 * 16 * 128, 1024)
    assert stage.encoder_bias is not None and tuple(stage.encoder_bias.shape) == (32, 16)
    assert stage.embed is None and stage.lm_head is None and stage.cache is not None
    assert stage.decoder_bias is None  # cross K/V need no position bias
    source = RandomWeights(cfg)
    q = source.get("encoder.block.5.layer.0.SelfAttention.q.weight", 0, 3 * 2048, 4 * 2048)
    assert torch.equal(enc.attn.qkv.weight[:2048].float(), q.bfloat16().float())
    bias = source.get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    assert torch.equal(stage.encoder_bias.float(), bias[:, 48:64].bfloat16().float())
