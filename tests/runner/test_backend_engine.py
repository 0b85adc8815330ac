"""The engine backends in-process, driven as a worker drives them: encode, hand the KV over,
merge into the running batch, and let sequences finish at different steps (free + compact
between steps, outside the stages' inference mode)."""

from __future__ import annotations

import pytest
import torch

from common.backend import DecodeSeq, EncodeItem
from common.backend_engine import EngineDecodeBackend, EngineEncodeBackend, load_spec


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=None, bos_token_id=1, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return load_spec(str(path))


def _generate_alone(spec, prompt: tuple[int, ...], n: int) -> list[int]:  # noqa: ANN001
    enc, dec = EngineEncodeBackend(spec, dtype="float32"), EngineDecodeBackend(spec, "float32")
    return _run(enc, dec, {"a": (prompt, n)})["a"]


def _run(enc, dec, reqs: dict[str, tuple[tuple[int, ...], int]]) -> dict[str, list[int]]:  # noqa: ANN001
    out: dict[str, list[int]] = {}
    items = [EncodeItem(r, p, n) for r, (p, n) in reqs.items()]
    for e in enc.encode(items):
        out[e.req_id] = [e.first_token]
        dec.add(DecodeSeq(e.req_id, len(reqs[e.req_id][0]), e.first_token, reqs[e.req_id][1],
                          e.kv))
    for _ in range(64):
        toks = dec.step()
        if not toks:
            break
        for t in toks:
            out[t.req_id].append(t.token)
    return out


def test_sequences_finishing_at_different_steps_match_alone(spec) -> None:  # noqa: ANN001
    torch.set_num_threads(1)
    reqs = {"a": ((5, 6, 7), 2), "b": (tuple(range(2, 128)), 9), "c": ((4,), 5)}
    enc, dec = EngineEncodeBackend(spec, dtype="float32"), EngineDecodeBackend(spec, "float32")
    # "b" crosses the cache's first 128 positions during decode: its buffers are reallocated
    # inside a decode step's inference mode, then compacted outside it when "c" finishes.
    batched = _run(enc, dec, reqs)
    assert {r: len(t) for r, t in batched.items()} == {"a": 2, "b": 9, "c": 5}
    for r, (prompt, n) in reqs.items():
        assert batched[r] == _generate_alone(spec, prompt, n)
