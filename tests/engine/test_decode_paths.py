"""The decode fast path (all sequences in consecutive slots with equal lengths: slice writes,
no length mask) against transformers, and next to the ragged path in the same cache."""

from __future__ import annotations

import pytest
import torch

from common.engine.batch import StageBatch
from common.models.registry import build_stage, load_model_spec
from tests.engine import tiny_hf

LOGIT_ATOL = 1e-4  # float32 tiny models, as in test_generate_hf


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)
    model = tiny_hf.hf_model("llama")
    return model, tiny_hf.save(model, tmp_path_factory.mktemp("llama"))


def _check_steps(model, stage, ids: list[str], seqs: list[list[int]], logits: torch.Tensor,
                 steps: int, uniform: bool) -> None:
    for _ in range(steps):
        with torch.inference_mode():
            for row, seq in enumerate(seqs):
                ref = model(torch.tensor([seq])).logits[0, -1]
                torch.testing.assert_close(logits[row], ref, atol=LOGIT_ATOL, rtol=0)
        nxt = logits.argmax(-1).tolist()
        for seq, tok in zip(seqs, nxt, strict=True):
            seq.append(tok)
        assert stage.cache.batch(ids).uniform is uniform
        logits = stage.decode(StageBatch.from_tokens(ids, nxt))


def test_equal_length_batch_uses_fast_path_and_matches(llama) -> None:
    model, directory = llama
    spec = load_model_spec(directory)
    stage = build_stage(spec.config, weights=spec.weights, dtype="float32")
    prompts = [[5, 17, 33, 42, 61], [11, 3, 250, 7, 7], [8, 9, 10, 11, 12]]
    ids = ["a", "b", "c"]
    logits = stage.encode(StageBatch.from_prompts(ids, prompts))
    _check_steps(model, stage, ids, [list(p) for p in prompts], logits, 4, uniform=True)


def test_equal_lengths_in_scattered_slots_take_ragged_path(llama) -> None:
    """Equal lengths but non-consecutive slots (a freed hole) must use the indexed path."""
    model, directory = llama
    spec = load_model_spec(directory)
    stage = build_stage(spec.config, weights=spec.weights, dtype="float32")
    prompts = [[5, 17, 33, 42], [1, 2, 3, 4], [11, 3, 250, 7]]
    logits = stage.encode(StageBatch.from_prompts(["a", "gone", "c"], prompts))
    stage.free("gone")
    ids, seqs = ["a", "c"], [list(prompts[0]), list(prompts[2])]
    _check_steps(model, stage, ids, seqs, logits[[0, 2]], 3, uniform=False)
