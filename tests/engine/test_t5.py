"""T5 against transformers: tiny random models saved with save_pretrained, greedy generation
token for token, decode-step logits, pipeline stages, tensor parallelism and KV export/import.

Two models: original T5 (ReLU FFN, tied + scaled LM head, 2+2 layers) and a v1.1-style one
(gated-GELU, separate LM head, 3 encoder + 2 decoder layers). ``initializer_factor=3`` makes the
random models produce varied tokens instead of one repeated token.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.engine.batch import StageBatch
from common.engine.generate import generate, run_generation
from common.engine.pipeline import LocalPipeline
from common.engine.sampling import SamplingParams
from common.models.registry import load_model_spec
from common.models.t5 import build_stage
from common.models.t5_pipeline import T5LocalPipeline, stage_ranges

torch.set_num_threads(1)

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31,
                                                    32, 33, 34, 35, 36, 37, 38], [40]]
MAX_NEW = 12
# Decode-step logits: |ours - transformers| <= LOGIT_RTOL * max|logit|. These random models
# (initializer_factor 3) have large activations and sharply peaked attention, so float32
# rounding is amplified at some steps: transformers' own batched-vs-unbatched logits differ by
# up to 3e-3 on a logit range of 35 (~1e-4 relative) at the same steps; typical steps ~1e-5.
LOGIT_RTOL = 1e-4
MODELS = {
    "relu": dict(num_layers=2, feed_forward_proj="relu"),
    "gated": dict(num_layers=3, num_decoder_layers=2, feed_forward_proj="gated-gelu",
                  tie_word_embeddings=False),
}


def _make_model(kind: str, directory: Path) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed({"relu": 3, "gated": 1}[kind])
    cfg = T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_heads=4, dropout_rate=0.0,
                   relative_attention_num_buckets=8, relative_attention_max_distance=20,
                   decoder_start_token_id=0, initializer_factor=3.0, **MODELS[kind])
    model = T5ForConditionalGeneration(cfg)
    if kind == "gated":  # transformers 5 ties lm_head unless the weights differ
        model.lm_head.weight = torch.nn.Parameter(torch.randn(96, 32) * 3.0)
    model.save_pretrained(directory)


def _hf_generate(directory: Path) -> list[list[int]]:
    """transformers' greedy output for PROMPTS as one right-padded batch, cut after EOS."""
    from transformers import T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(directory).eval()
    longest = max(map(len, PROMPTS))
    ids = torch.tensor([p + [0] * (longest - len(p)) for p in PROMPTS])
    mask = torch.tensor([[1] * len(p) + [0] * (longest - len(p)) for p in PROMPTS])
    # asymmetric layer counts break transformers' own KV cache: recompute instead
    asymmetric = model.config.num_layers != model.config.num_decoder_layers
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW,
                         do_sample=False, use_cache=not asymmetric)
    eos = model.config.eos_token_id
    rows = []
    for row in out[:, 1:].tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[list[int]]]]:
    root = tmp_path_factory.mktemp("t5")
    out = {}
    for kind in MODELS:
        _make_model(kind, root / kind)
        out[kind] = (root / kind, _hf_generate(root / kind))
    return out


def _greedy(n: int = MAX_NEW) -> SamplingParams:
    return SamplingParams(max_new_tokens=n)


# Requests stop at different steps, so the decode batch shrinks: frees and cache compaction
# (cross-attention K/V included) happen mid-generation.
STAGGERED = [MAX_NEW, 4, MAX_NEW, 2]


def _staggered(expected: list[list[int]]) -> list[list[int]]:
    return [row[:n] for row, n in zip(expected, STAGGERED, strict=True)]


@pytest.mark.parametrize("kind", list(MODELS))
def test_greedy_matches_transformers(models: dict, kind: str) -> None:
    directory, expected = models[kind]
    results = generate(directory, PROMPTS, _greedy(), dtype="float32")
    assert [r.token_ids for r in results] == expected
    assert any(len(set(row)) > 3 for row in expected)  # the reference is not degenerate
    results = generate(directory, PROMPTS, [_greedy(n) for n in STAGGERED], dtype="float32")
    assert [r.token_ids for r in results] == _staggered(expected)


@pytest.mark.parametrize("kind", list(MODELS))
def test_decode_logits_match_transformers(models: dict, kind: str) -> None:
    """Teacher-forced: our per-step logits (ragged batch) vs transformers' full forward of
    each sequence alone."""
    from transformers import T5ForConditionalGeneration

    directory, expected = models[kind]
    hf = T5ForConditionalGeneration.from_pretrained(directory).eval()
    spec = load_model_spec(directory)
    stage = build_stage(spec.config, weights=spec.weights)
    req_ids = [f"r{i}" for i in range(len(PROMPTS))]
    steps = min(len(row) for row in expected)
    ours = [stage.encode(StageBatch.from_prompts(req_ids, PROMPTS))]
    for t in range(steps - 1):
        ours.append(stage.decode(StageBatch.from_tokens(req_ids, [r[t] for r in expected])))
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([prompt]),
                     decoder_input_ids=torch.tensor([[0] + expected[i][: steps - 1]])).logits[0]
        got = torch.stack([step[i] for step in ours])
        torch.testing.assert_close(got, ref, atol=LOGIT_RTOL * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("kind", list(MODELS))
def test_two_stages_in_process(models: dict, kind: str) -> None:
    """RRA layout (each stage half the encoder and half the decoder: encoder output handed
    back) and an encoder-stage -> decoder-stage layout."""
    directory, expected = models[kind]
    spec = load_model_spec(directory)
    cfg = spec.config
    layouts = [stage_ranges(cfg, 2),
               [((0, cfg.num_encoder_layers), (0, 0)), ((0, 0), (0, cfg.num_layers))]]
    for layout in layouts:
        stages = [build_stage(cfg, encoder_layer_range=e, layer_range=d, weights=spec.weights)
                  for e, d in layout]
        results = run_generation(T5LocalPipeline(stages), PROMPTS,
                                 [_greedy(n) for n in STAGGERED], cfg)
        assert [r.token_ids for r in results] == _staggered(expected), layout


def test_kv_export_import_round_trip(models: dict) -> None:
    """Export every request after 3 decode steps, import into a fresh stage (other slots) and
    back into the freed source: both continue exactly as transformers does."""
    directory, expected = models["gated"]
    spec = load_model_spec(directory)
    cfg = spec.config
    source = build_stage(cfg, weights=spec.weights)
    req_ids = [f"r{i}" for i in range(len(PROMPTS))]
    tokens = source.encode(StageBatch.from_prompts(req_ids, PROMPTS)).argmax(-1).tolist()
    generated = [[t] for t in tokens]
    for _ in range(3):
        tokens = source.decode(StageBatch.from_tokens(req_ids, tokens)).argmax(-1).tolist()
        for row, t in zip(generated, tokens, strict=True):
            row.append(t)
    exports = [source.export_kv(r) for r in req_ids]
    for exp, prompt in zip(exports, PROMPTS, strict=True):
        assert exp.seq_len == 4  # the start token + 3 decoded tokens
        assert tuple(exp.tensors["k"].shape) == (cfg.num_layers, cfg.num_heads, 4, cfg.head_dim)
        assert tuple(exp.tensors["cross_v"].shape) == (cfg.num_layers, cfg.num_heads,
                                                       len(prompt), cfg.head_dim)
    target = build_stage(cfg, weights=spec.weights)
    for exp in reversed(exports):
        target.import_kv(exp)
    for r in req_ids:
        source.free(r)
    for exp in exports:
        source.import_kv(exp)
    for _ in range(MAX_NEW - 4):
        want = source.decode(StageBatch.from_tokens(req_ids, tokens))
        got = target.decode(StageBatch.from_tokens(req_ids, tokens))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)  # same arithmetic
        tokens = want.argmax(-1).tolist()
        for row, t in zip(generated, tokens, strict=True):
            row.append(t)
    assert [row[: len(ref)] for row, ref in zip(generated, expected, strict=True)] == expected


@pytest.mark.parametrize("kind", list(MODELS))
def test_encoder_worker_handoff(models: dict, kind: str) -> None:
    """WAA: an encoder worker holding the encoder and only the cross K/V projections exports
    cross K/V (self-attention KV empty); a decoder worker without encoder layers imports it and
    generates from the start token exactly like transformers."""
    directory, expected = models[kind]
    spec = load_model_spec(directory)
    cfg = spec.config
    encoder = build_stage(cfg, weights=spec.weights, cross_kv_only=True)
    decoder = build_stage(cfg, weights=spec.weights, encoder_layer_range=(0, 0))
    full = build_stage(cfg, weights=spec.weights)
    assert encoder.embed is not None and encoder.lm_head is None
    assert sum(p.numel() for p in encoder.parameters()) < 0.7 * sum(
        p.numel() for p in full.parameters())
    req_ids = [f"r{i}" for i in range(len(PROMPTS))]
    encoder.encode(StageBatch.from_prompts(req_ids, PROMPTS))
    for r in req_ids:
        exp = encoder.export_kv(r)
        assert exp.seq_len == 0 and exp.tensors["k"].shape[2] == 0
        decoder.import_kv(exp)
        encoder.free(r)
    with pytest.raises(ValueError, match="cross_kv_only"):
        encoder.decode(StageBatch.from_tokens(req_ids, [0] * len(req_ids)))
    pipe = T5LocalPipeline([decoder])
    for r in req_ids:
        pipe.sampler.add(r, _greedy())
    tokens = [0] * len(req_ids)  # the start token (pad)
    generated: list[list[int]] = [[] for _ in req_ids]
    for _ in range(MAX_NEW):
        tokens = pipe.decode(StageBatch.from_tokens(req_ids, tokens))
        for row, t in zip(generated, tokens, strict=True):
            row.append(t)
    assert [row[: len(ref)] for row, ref in zip(generated, expected, strict=True)] == expected


def test_spawned_tp2_pipeline_and_resharding(models: dict, tmp_path: Path) -> None:
    """One spawned 2-rank group runs every multi-process case (spawning is the slow part):
    tp 2, two RRA pipeline stages, and KV saved under one tp layout and loaded under another."""
    from common.engine.dist import run_spmd
    from common.engine.generate import GenerateJob

    sampling = [_greedy(n) for n in STAGGERED]
    relu_dir, relu_full = models["relu"]
    relu_expected, gated_expected = _staggered(relu_full), _staggered(models["gated"][1])
    spec = load_model_spec(relu_dir)
    local = LocalPipeline(build_stage(spec.config, weights=spec.weights))
    saved_tp1 = tmp_path / "kv-tp1"
    reference = run_generation(local, PROMPTS, sampling, spec.config,
                               kv_save_dir=str(saved_tp1))
    assert [r.token_ids for r in reference] == relu_expected

    def job(kind: str, **kv: str) -> dict:
        return GenerateJob(model=str(models[kind][0]), prompts=PROMPTS, sampling=sampling,
                           dtype="float32", **kv).to_json()

    runs = [{"tp_size": 2, "num_stages": 1, "job": job("relu")},
            {"tp_size": 2, "num_stages": 1, "job": job("gated")},
            {"tp_size": 1, "num_stages": 2, "job": job("relu")},
            {"tp_size": 1, "num_stages": 2, "job": job("gated")},
            {"tp_size": 2, "num_stages": 1, "job": job("relu", kv_load_dir=str(saved_tp1))},
            {"tp_size": 2, "num_stages": 1, "job": job("relu", kv_save_dir=str(tmp_path / "a"))},
            {"tp_size": 1, "num_stages": 2, "job": job("relu", kv_save_dir=str(tmp_path / "b"))}]
    outputs = run_spmd("common.models.t5_pipeline:spmd_main", {"runs": runs}, 2)[0]
    tokens = [[r["token_ids"] for r in out] for out in outputs]
    assert tokens[0] == relu_expected and tokens[2] == relu_expected
    assert tokens[1] == gated_expected and tokens[3] == gated_expected
    assert tokens[4] == relu_expected  # KV from tp 1, continued at tp 2
    for saved in ("a", "b"):  # KV from tp 2 / from two stages, continued at tp 1
        local = LocalPipeline(build_stage(spec.config, weights=spec.weights))
        resumed = run_generation(local, PROMPTS, sampling, spec.config,
                                 kv_load_dir=str(tmp_path / saved))
        assert [r.token_ids for r in resumed] == relu_expected, saved
