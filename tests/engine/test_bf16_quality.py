"""bf16 SmolLM2 answers: our engine vs transformers bf16 on the same GGUF weights (slow).

Exact token equality with transformers' bf16 is not a property either implementation has:
two bf16 runs that differ only in accumulation order (oneDNN's blocking, our kernels, fused
QKV) move every logit by up to ~0.5, and real prompts have near-ties: "Give three tips for
writing clear code." has float32 logits '1' 31.99 vs 'Here' 31.87, which transformers' bf16
rounds to an exact tie (32.0, 32.0, decided by token id). So the test demands: the same greedy
tokens, except that where the two first differ, float32 transformers calls it a near-tie
(the two tokens' float32 logits within ``NEAR_TIE``); and prefill logits about as close to
float32 as transformers' own bf16 logits are (summed RMS error over the prompts within 2x;
measured 1.5x).

Run: .venv/bin/python -m pytest -m slow tests/engine/test_bf16_quality.py
"""

from __future__ import annotations

import pytest
import torch

from common.engine.generate import generate
from common.engine.sampling import SamplingParams
from common.models.registry import load_model_spec

torch.set_num_threads(1)
pytest.importorskip("transformers")

NEW_TOKENS = 16
NEAR_TIE = 0.3  # float32 logit gap below which bf16 noise (~0.5 max over the vocabulary) decides
QUESTIONS = ["What is the capital of France?", "Explain in two sentences why the sky is blue.",
             "What does a CPU cache do?", "Who wrote Romeo and Juliet?",
             "What is the boiling point of water at sea level?"]


def _reference(dtype: str) -> torch.nn.Module:
    from common.models.gguf_loader import default_gguf_path
    from coordinator.commands._engine_bench import TransformersDecoder

    return TransformersDecoder(load_model_spec(default_gguf_path()), dtype).model


def _greedy(model: torch.nn.Module, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=NEW_TOKENS, pad_token_id=2)
    return out[0, len(prompt):].tolist()


def _last_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, -1].float()


@pytest.mark.slow
def test_bf16_greedy_matches_transformers_bf16_up_to_near_ties() -> None:
    from common.models.gguf_loader import default_gguf_path

    spec = load_model_spec(default_gguf_path())
    tok = spec.tokenizer
    assert tok is not None
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    ours = generate(spec, prompts, SamplingParams(max_new_tokens=NEW_TOKENS), dtype="bfloat16")
    hf_bf16, hf_fp32 = _reference("bfloat16"), _reference("float32")
    exact = 0
    for prompt, result in zip(prompts, ours, strict=True):
        ref = _greedy(hf_bf16, prompt)
        if result.token_ids == ref[: len(result.token_ids)]:
            exact += 1
            continue
        i = next(j for j, (a, b) in enumerate(zip(result.token_ids, ref, strict=False))
                 if a != b)
        logits = _last_logits(hf_fp32, prompt + ref[:i])
        gap = float((logits[result.token_ids[i]] - logits[ref[i]]).abs())
        assert gap < NEAR_TIE, (f"token {i} differs without a near-tie (float32 gap {gap:.3f}):"
                                f" ours {tok.decode(result.token_ids)!r} vs "
                                f"transformers {tok.decode(ref)!r}")
    assert "Paris" in tok.decode(ours[0].token_ids)
    assert exact >= len(QUESTIONS) - 1  # near-ties are rare: at most one prompt may hit one


@pytest.mark.slow
def test_bf16_prefill_logits_as_accurate_as_transformers_bf16() -> None:
    from common.engine.batch import StageBatch
    from common.models.gguf_loader import default_gguf_path
    from common.models.registry import build_stage

    spec = load_model_spec(default_gguf_path())
    tok = spec.tokenizer
    assert tok is not None
    stage = build_stage(spec.config, weights=spec.weights, dtype="bfloat16")
    hf_bf16, hf_fp32 = _reference("bfloat16"), _reference("float32")
    ours_rms, theirs_rms = [], []
    for i, q in enumerate(QUESTIONS):
        prompt = tok.encode_chat([{"role": "user", "content": q}])
        ours = stage.encode(StageBatch.from_prompts([f"q{i}"], [prompt])).float()[0]
        exact = _last_logits(hf_fp32, prompt)
        ours_rms.append(float((ours - exact).pow(2).mean().sqrt()))
        theirs_rms.append(float((_last_logits(hf_bf16, prompt) - exact).pow(2).mean().sqrt()))
    # Per prompt either side may be 3x the other (bf16 noise is chaotic over 30 layers:
    # measured 0.07-0.35 for one prompt across equally valid rounding orders); the sum over
    # the prompts is the stable figure. Measured: ours 1.04 vs transformers 0.69 (1.5x; the
    # source of the difference is not identified); a real numeric bug is far above 2x.
    assert sum(ours_rms) <= 2.0 * sum(theirs_rms), (ours_rms, theirs_rms)
