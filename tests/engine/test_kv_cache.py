"""KVCache bookkeeping, export/import and re-sharding, and an in-process handoff continuation."""

from __future__ import annotations

import pytest
import torch

from common.engine.batch import StageBatch
from common.engine.kv_cache import KVCache, KVExport
from common.engine.tp import TPGroup, kv_head_range
from common.models.registry import build_stage, load_model_spec


def _cache(**kw: int) -> KVCache:
    args = dict(layer_start=2, layer_end=5, head_start=0, head_end=4, num_kv_heads=4,
                head_dim=3, dtype=torch.float32, max_slots=2, len_step=4) | kw
    return KVCache(**args)


def _fill(cache: KVCache, req_id: str, length: int, base: float) -> None:
    cache.add(req_id)
    slot = cache.slot(req_id)
    for layer in range(cache.layer_start, cache.layer_end):
        for name in ("k", "v"):
            values = torch.arange(cache.num_heads * length * 3, dtype=torch.float32)
            values = values.view(cache.num_heads, length, 3) + base + 100 * layer
            cache.write(layer, name, slot, 0, values + (0.5 if name == "v" else 0))
    cache.set_length(req_id, length)


def test_free_compact_and_growth_preserve_contents() -> None:
    cache = _cache()
    for i, n in enumerate([3, 9, 2, 5]):  # grows slots 2 -> 4 and capacity 4 -> 12
        _fill(cache, f"r{i}", n, base=1000 * i)
    before = {r: cache.export(r) for r in cache.order()}
    cache.free("r0")
    cache.free("r2")
    cache.compact()
    assert cache.order() == ["r3", "r1"]  # the highest slot moved into the first hole
    assert [cache.slot(r) for r in cache.order()] == [0, 1]
    for r in ("r1", "r3"):
        after = cache.export(r)
        assert after.seq_len == before[r].seq_len
        for name in ("k", "v"):
            assert torch.equal(after.tensors[name], before[r].tensors[name])
    batch = cache.batch(["r3", "r1"])
    assert batch.span == (0, 2) and batch.lengths.tolist() == [5, 9]


def test_append_writes_at_each_sequence_length() -> None:
    cache = _cache(layer_start=0, layer_end=1, num_kv_heads=2, head_end=2)
    _fill(cache, "a", 2, 0.0)
    _fill(cache, "b", 4, 0.0)
    batch = cache.batch(["a", "b"])
    new = torch.full((2, 2, 3), -7.0)
    cache.append(0, "k", batch, new)
    cache.advance(["a", "b"])
    assert cache.seq_len("a") == 3 and cache.seq_len("b") == 5
    assert torch.equal(cache.sequence(0, "k", "a")[:, 2], new[0])
    assert torch.equal(cache.sequence(0, "k", "b")[:, 4], new[1])
    view = cache.view(0, "k", cache.batch(["a", "b"]), 5)
    assert view.shape == (2, 2, 5, 3) and view.data_ptr() == cache._bufs["k"].data_ptr()


def test_export_is_contiguous_and_reshards_across_head_ranges() -> None:
    full = _cache()
    _fill(full, "x", 6, 0.0)
    exp = full.export("x", layers=(3, 5), kv_heads=(1, 3))
    assert exp.tensors["k"].shape == (2, 2, 6, 3) and exp.tensors["k"].is_contiguous()
    # tp 1 -> 2: each half imports the slice it owns from the full export
    halves = [_cache(head_start=h0, head_end=h1) for h0, h1 in ((0, 2), (2, 4))]
    for half in halves:
        half.import_(full.export("x"))
        assert torch.equal(half.export("x").tensors["v"],
                           full.export("x", kv_heads=(half.head_start, half.head_end))
                           .tensors["v"])
    # tp 2 -> 1: a full cache imports both halves
    merged = _cache()
    for half in halves:
        merged.import_(half.export("x"))
    assert torch.equal(merged.export("x").tensors["k"], full.export("x").tensors["k"])
    assert merged.seq_len("x") == 6


def test_export_rejects_ranges_not_held() -> None:
    cache = _cache(head_start=2, head_end=4)
    _fill(cache, "x", 2, 0.0)
    with pytest.raises(ValueError, match="not held"):
        cache.export("x", kv_heads=(0, 2))
    with pytest.raises(ValueError, match="bad KVExport"):
        KVExport(req_id="x", seq_len=1, layer_start=0, layer_end=1, head_start=3,
                 head_end=2, num_kv_heads=4)


def test_kv_head_ranges_split_or_replicate() -> None:
    def ranges(kv: int, heads: int, tp: int) -> list[tuple[int, int]]:
        return [kv_head_range(kv, heads, TPGroup(tp, r, group=object())) for r in range(tp)]

    assert ranges(4, 8, 2) == [(0, 2), (2, 4)]
    assert ranges(2, 8, 4) == [(0, 1), (0, 1), (1, 2), (1, 2)]
    with pytest.raises(ValueError, match="does not divide num_heads"):
        ranges(2, 6, 4)
    with pytest.raises(ValueError, match="multiple"):
        ranges(4, 12, 6)


def test_handoff_between_stages_continues_identically() -> None:
    """Encode on one stage, export, import into a fresh stage, decode: same as never moving."""
    torch.set_num_threads(1)
    spec = load_model_spec("tiny-llama")
    prompts = [[5, 6, 7, 8], [9, 10]]
    ids = ["a", "b"]

    def run(stage, first_logits) -> list[list[int]]:
        toks = first_logits.argmax(-1).tolist()
        out = [[t] for t in toks]
        for _ in range(5):
            toks = stage.decode(StageBatch.from_tokens(ids, toks)).argmax(-1).tolist()
            for seq, t in zip(out, toks, strict=True):
                seq.append(t)
        return out

    make = lambda: build_stage(spec.config, weights=spec.weights, dtype="float32")  # noqa: E731
    encoder = make()
    first = encoder.encode(StageBatch.from_prompts(ids, prompts))
    exports = [encoder.cache.export(r) for r in ids]
    decoder = make()
    for exp in exports:
        decoder.cache.import_(exp)
    assert run(decoder, first) == run(encoder, first)


def test_decode_in_any_slot_order_gives_the_same_logits() -> None:
    """A batch whose slots are not consecutive (a micro-batch, another order) gathers instead
    of viewing; the results must not change."""
    torch.set_num_threads(1)
    spec = load_model_spec("tiny-opt")
    outs = []
    for order in (["a", "b", "c"], ["c", "a"]):
        stage = build_stage(spec.config, weights=spec.weights, dtype="float32")
        stage.encode(StageBatch.from_prompts(["a", "b", "c"], [[5, 6, 7], [9], [3, 4]]))
        tokens = {"a": 11, "b": 12, "c": 13}
        logits = stage.decode(StageBatch.from_tokens(order, [tokens[r] for r in order]))
        outs.append(dict(zip(order, logits, strict=True)))
    for r in ("a", "c"):
        torch.testing.assert_close(outs[0][r], outs[1][r], atol=1e-5, rtol=0)


def test_cache_filled_in_inference_mode_can_be_managed_outside_it() -> None:
    """Workers fill the cache inside the stages' inference mode and free/compact/import
    between steps outside it; torch refuses in-place updates of inference tensors there."""
    cache = _cache()
    with torch.inference_mode():
        for i, n in enumerate([3, 9, 2, 5]):  # buffers allocated and grown as inference tensors
            _fill(cache, f"r{i}", n, base=1000 * i)
    before = cache.export("r3")
    cache.free("r0")
    cache.compact()
    cache.import_(KVExport(**{**before.__dict__, "req_id": "r9"}))
    cache.reserve("k", 64)
    for name in ("k", "v"):
        assert torch.equal(cache.export("r9").tensors[name], before.tensors[name])
