"""The null backend: KV payloads of the real size, the documented token rule, early exit."""

from __future__ import annotations

import pytest

from common.backend import (
    DecodeSeq,
    EncodeItem,
    NullDecodeBackend,
    NullEncodeBackend,
    NullShape,
    null_token,
    null_tokens,
)
from common.models.config import ModelConfig


def _bytes_by_hand(cfg: ModelConfig, prompt_len: int, heads: int) -> int:
    # K and V, every decoder layer, bf16 (2 bytes) -- written out independently of kv_shapes
    return 2 * cfg.num_layers * heads * prompt_len * cfg.head_dim * 2


@pytest.mark.parametrize("preset", ["smollm2-135m", "opt-13b", "tiny-llama"])
def test_kv_payload_has_the_real_size(preset: str) -> None:
    cfg = ModelConfig.preset(preset)
    shape = NullShape(cfg)
    out = NullEncodeBackend(shape).encode([EncodeItem("r", tuple(range(1, 38)), 4)])[0]
    sent = sum(t.nbytes for t in out.kv.values())
    assert sent == _bytes_by_hand(cfg, 37, cfg.kv_heads) == shape.kv_bytes(37)
    assert sent == cfg.kv_bytes_per_token_per_layer(2) * 37 * cfg.num_layers
    assert all(t.dtype == "bfloat16" for t in out.kv.values())


def test_t5_hands_over_cross_attention_kv_sized_by_the_encoder_input() -> None:
    cfg = ModelConfig.preset("tiny-t5")
    kv = NullEncodeBackend(NullShape(cfg)).encode([EncodeItem("r", (5,) * 11, 3)])[0].kv
    assert kv["cross_k"].shape == (cfg.num_layers, cfg.kv_heads, 11, cfg.head_dim)
    assert kv["k"].shape[2] == 0


def test_tp_ranks_split_kv_heads_and_reject_impossible_splits() -> None:
    cfg = ModelConfig.preset("tiny-llama")  # 2 KV heads
    assert [NullShape(cfg, r, 2).head_range() for r in range(2)] == [(0, 1), (1, 2)]
    assert [NullShape(cfg, r, 4).head_range() for r in range(4)] == [(0, 1), (0, 1), (1, 2),
                                                                      (1, 2)]
    with pytest.raises(ValueError, match="do not split over tp_size 2"):
        NullShape(ModelConfig.preset("smollm2-135m"), 0, 2)  # 3 KV heads


def test_decode_continues_the_documented_rule_and_stops_at_max_new_tokens() -> None:
    cfg = ModelConfig.preset("smollm2-135m")
    shape = NullShape(cfg)
    prompts = {"a": (7, 8, 9), "b": (1000,) * 20}
    lengths = {"a": 5, "b": 2}
    dec = NullDecodeBackend(shape)
    got: dict[str, list[int]] = {}
    for req_id, prompt in prompts.items():
        first = NullEncodeBackend(shape).encode([EncodeItem(req_id, prompt, lengths[req_id])])[0]
        got[req_id] = [first.first_token]
        dec.add(DecodeSeq(req_id, len(prompt), first.first_token, lengths[req_id], first.kv))
    steps = 0
    while dec.num_active:
        for tok in dec.step():
            assert tok.position == len(got[tok.req_id])
            got[tok.req_id].append(tok.token)
        steps += 1
    assert steps == 4
    for req_id, prompt in prompts.items():
        want = [null_token(prompt, i, cfg.vocab_size) for i in range(lengths[req_id])]
        assert got[req_id] == want == null_tokens(prompt, lengths[req_id], cfg.vocab_size)


def test_decoder_refuses_kv_of_the_wrong_shape() -> None:
    shape = NullShape(ModelConfig.preset("tiny-llama"))
    kv = NullEncodeBackend(shape).encode([EncodeItem("r", (1, 2, 3), 4)])[0].kv
    with pytest.raises(ValueError, match="do not match"):
        NullDecodeBackend(shape).add(DecodeSeq("r", 4, 0, 4, kv))  # says 4 tokens, KV has 3


def test_cancelled_sequences_leave_the_batch() -> None:
    shape = NullShape(ModelConfig.preset("tiny-llama"))
    dec = NullDecodeBackend(shape)
    for req_id in ("x", "y"):
        kv = NullEncodeBackend(shape).encode([EncodeItem(req_id, (1,), 9)])[0].kv
        dec.add(DecodeSeq(req_id, 1, 0, 9, kv))
    dec.remove("x")
    assert [t.req_id for t in dec.step()] == ["y"]
