"""Our engine against transformers on tiny random HF checkpoints, in one process (tp 1, 1 stage)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from common.engine.batch import StageBatch
from common.engine.generate import generate
from common.engine.sampling import SamplingParams
from common.models.registry import build_stage, load_model_spec

_spec = importlib.util.spec_from_file_location("tiny_hf", Path(__file__).with_name("tiny_hf.py"))
assert _spec is not None and _spec.loader is not None
tiny_hf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny_hf)

FAMILIES = ["llama", "opt", "gpt2"]
LOGIT_ATOL = 1e-4  # float32, tiny models: observed differences are ~1e-6


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)
    model = tiny_hf.hf_model(request.param)
    directory = tiny_hf.save(model, tmp_path_factory.mktemp(request.param))
    return request.param, model, directory


def test_greedy_batch_matches_transformers(checkpoint) -> None:
    _, model, directory = checkpoint
    expected = tiny_hf.greedy_reference(model, tiny_hf.PROMPTS, tiny_hf.MAX_NEW)
    params = [SamplingParams(max_new_tokens=n) for n in tiny_hf.MAX_NEW]
    results = generate(str(directory), tiny_hf.PROMPTS, params, dtype="float32")
    assert [r.token_ids for r in results] == expected
    assert [r.num_prompt_tokens for r in results] == [len(p) for p in tiny_hf.PROMPTS]


def test_step_logits_match_transformers(checkpoint) -> None:
    """Prefill and every decode step of a ragged batch against a full HF forward pass."""
    _, model, directory = checkpoint
    spec = load_model_spec(directory)
    stage = build_stage(spec.config, weights=spec.weights, dtype="float32")
    prompts = tiny_hf.PROMPTS[:3]
    ids = [f"r{i}" for i in range(len(prompts))]
    seqs = [list(p) for p in prompts]
    logits = stage.encode(StageBatch.from_prompts(ids, prompts))
    for _step in range(5):
        with torch.inference_mode():
            for row, seq in enumerate(seqs):
                ref = model(torch.tensor([seq])).logits[0, -1]
                torch.testing.assert_close(logits[row], ref, atol=LOGIT_ATOL, rtol=0)
        nxt = logits.argmax(-1).tolist()
        for seq, tok in zip(seqs, nxt, strict=True):
            seq.append(tok)
        logits = stage.decode(StageBatch.from_tokens(ids, nxt))


def test_bfloat16_runs_close_to_float32(checkpoint) -> None:
    _, _, directory = checkpoint
    spec = load_model_spec(directory)
    prompts = tiny_hf.PROMPTS[:2]
    out = {}
    for dtype in ("float32", "bfloat16"):
        stage = build_stage(spec.config, weights=spec.weights, dtype=dtype)
        assert stage.lm_head is not None and stage.lm_head.weight.dtype == getattr(torch, dtype)
        out[dtype] = stage.encode(StageBatch.from_prompts(["a", "b"], prompts))
    scale = out["float32"].abs().max()
    assert (out["bfloat16"] - out["float32"]).abs().max() < 0.05 * scale


def test_free_and_compact_keep_other_sequences_exact(checkpoint) -> None:
    """Finishing the first request early and compacting must not disturb the others."""
    _, model, directory = checkpoint
    prompts = tiny_hf.PROMPTS
    max_new = [1, 9, 2, 7]
    expected = tiny_hf.greedy_reference(model, prompts, max_new)
    params = [SamplingParams(max_new_tokens=n) for n in max_new]
    results = generate(str(directory), prompts, params, dtype="float32")
    assert [r.token_ids for r in results] == expected
    assert all(r.finish_reason in ("length", "stop") for r in results)
