"""Sampling: filters against a direct computation, per-request seeds, stop conditions."""

from __future__ import annotations

import pytest
import torch

from common.engine.generate import generate
from common.engine.sampling import (
    FINISH_LENGTH,
    FINISH_STOP,
    Sampler,
    SamplingParams,
    filter_logits,
    finish_reason,
)


def test_top_k_and_top_p_keep_the_expected_tokens() -> None:
    logits = torch.log(torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15]))
    kept = lambda p: torch.isfinite(filter_logits(logits, p)).nonzero().flatten().tolist()  # noqa: E731
    assert kept(SamplingParams(temperature=1.0, top_k=2)) == [1, 3]
    # nucleus 0.75: 0.4 + 0.3 = 0.7 < 0.75, so the next token (0.15) is needed too
    assert kept(SamplingParams(temperature=1.0, top_p=0.75)) == [1, 3, 4]
    assert kept(SamplingParams(temperature=1.0, top_p=0.7)) == [1, 3]
    assert kept(SamplingParams(temperature=1.0, top_p=0.01)) == [1]


def test_temperature_sampling_matches_its_distribution() -> None:
    probs = torch.tensor([0.1, 0.6, 0.3])
    sampler = Sampler()
    sampler.add("r", SamplingParams(temperature=1.0, seed=3))
    draws = [sampler.sample(["r"], probs.log().unsqueeze(0))[0] for _ in range(3000)]
    freq = torch.bincount(torch.tensor(draws), minlength=3).float() / len(draws)
    assert torch.allclose(freq, probs, atol=0.03)


def test_seed_is_reproducible_and_independent_of_the_batch() -> None:
    torch.set_num_threads(1)
    params = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=7)
    other = SamplingParams(max_new_tokens=5, temperature=1.3, seed=1)
    alone = generate("tiny-llama", [[3, 4, 5]], params, dtype="float32")[0].token_ids
    again = generate("tiny-llama", [[3, 4, 5]], params, dtype="float32")[0].token_ids
    batched = generate("tiny-llama", [[9, 9, 9, 9], [3, 4, 5]], [other, params],
                       dtype="float32")[1].token_ids
    assert alone == again == batched
    reseeded = SamplingParams(**{**params.__dict__, "seed": 8})
    assert generate("tiny-llama", [[3, 4, 5]], reseeded, dtype="float32")[0].token_ids != alone


def test_stop_conditions() -> None:
    p = SamplingParams(max_new_tokens=3, stop_token_ids=(42,))
    assert finish_reason(2, 1, p, (2,)) == FINISH_STOP
    assert finish_reason(42, 1, p, (2,)) == FINISH_STOP
    assert finish_reason(5, 2, p, (2,)) is None
    assert finish_reason(5, 3, p, (2,)) == FINISH_LENGTH
    assert finish_reason(2, 1, SamplingParams(ignore_eos=True), (2,)) is None


def test_generation_stops_on_a_stop_token() -> None:
    full = generate("tiny-gpt2", [[1, 2, 3]], SamplingParams(max_new_tokens=8, ignore_eos=True),
                    dtype="float32")[0].token_ids
    stop = full[3]
    res = generate("tiny-gpt2", [[1, 2, 3]],
                   SamplingParams(max_new_tokens=8, ignore_eos=True, stop_token_ids=(stop,)),
                   dtype="float32")[0]
    assert res.finish_reason == FINISH_STOP
    assert res.token_ids == full[: full.index(stop) + 1]


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1.0),
                                 dict(top_p=0.0), dict(top_k=-2)])
def test_invalid_params_are_rejected(bad: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_first_argmax_matches_torch_argmax() -> None:
    """The blocked argmax returns torch's indices: first maximum on ties, NaN as maximal,
    vocabularies that are not a multiple of the block, float32 and bf16."""
    import torch

    from common.engine.sampling import first_argmax

    gen = torch.Generator().manual_seed(0)
    for vocab in (100, 2048, 3000, 49152, 50001):
        for trial in range(6):
            x = torch.randn(5, vocab, generator=gen)
            if trial % 2 == 0:
                x = x.round()  # many ties
            if trial == 1:
                x[:, -1] = 100.0  # max in the short tail block
            if trial == 3:
                x[0, 3] = x[0, vocab // 2] = float("nan")
            for t in (x, x.bfloat16()):
                assert torch.equal(first_argmax(t), t.argmax(-1)), (vocab, trial, t.dtype)
