"""A WAA re-run after a worker loss continues a seeded request's draws: re-encoding prompt +
the k tokens already streamed with ``output_offset = k`` (docs/mesh.md, "Worker loss") gives
output positions k.. of the uninterrupted run, token for token, on the whole-model WAA
backends and on staged WAA stages (the encoder samples position k; ``KVHandoff.output_offset``
tells the decoder to go on at k + 1). A re-run that ignored the offset would draw positions
0.. again: the last test shows that gives other tokens, so the equality checks can fail."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import torch

from common import protocol as P
from common.backend import DecodeSeq, EncodeItem
from common.backend_engine import EngineDecodeBackend, EngineEncodeBackend
from common.backend_engine_tp import TPEncodeBackend, init_tp_group
from common.backend_engine_tpdec import TPDecodeBackend
from common.backend_waa_stage import WaaDecoderStage, WaaEncoderStage, payload
from common.engine.generate import generate
from common.engine.sampling import SamplingParams
from common.models.registry import load_model_spec

torch.set_num_threads(1)
SPEC = load_model_spec("tiny-llama", seed=4)  # 2 layers
PROMPT = (5, 6, 7, 8, 9)
N, K = 9, 4  # tokens of the whole request; tokens the client had when the worker died
SEEDED = P.Sampling(temperature=1.0, seed=1234, ignore_eos=True)


def whole_model(prompt: tuple[int, ...], n: int, offset: int,
                enc: Any = None, dec: Any = None) -> list[int]:
    """One request through EngineEncodeBackend -> KV -> EngineDecodeBackend (or the given
    backends), as the WAA workers run it (the decoder gets the offset the KVHandoff carries)."""
    enc = enc or EngineEncodeBackend(SPEC, "float32")
    dec = dec or EngineDecodeBackend(SPEC, "float32")
    (e,) = enc.encode([EncodeItem("r", prompt, n, SEEDED, offset)])
    seq = DecodeSeq("r", len(prompt), e.first_token, n, e.kv, head_range=e.head_range,
                    layer_range=e.layer_range, sampling=SEEDED, output_offset=offset)
    out = [e.first_token]
    if dec.first_reason(seq) is not None:
        return out
    dec.add(seq)
    for _ in range(n):
        step = dec.step()
        out += [t.token for t in step]
        if step and step[0].finished:
            assert step[0].reason == "length" and dec.num_active == 0
            return out
    raise AssertionError("the request never finished")


def staged(prompt: tuple[int, ...], n: int, offset: int) -> list[int]:
    """One request through a staged WAA plan: an encoder stage of both layers, decoder stages
    of one layer each, the KV split between them as KVHandoffs through the wire codec."""
    enc = WaaEncoderStage(SPEC, (0, 2), dtype="float32")
    dec = [WaaDecoderStage(SPEC, (0, 1), dtype="float32"),
           WaaDecoderStage(SPEC, (1, 2), dtype="float32")]
    req = P.EncodeRequest(req_id="r", prompt_ids=prompt, max_new_tokens=n, sampling=SEEDED,
                          output_offset=offset)
    first = enc.run(P.StagePass(pass_id=1, stream=0, kind="encode", req_ids=("r",),
                                requests=(req,))).tokens[0].token
    exp = enc.export_batch(["r"], 0)["r"]
    for stage, layers in zip(dec, [(0, 1), (1, 2)], strict=True):
        h = P.KVHandoff(req_id="r", encoder_id="enc0", first_token=first, prompt_len=len(prompt),
                        max_new_tokens=n, sampling=SEEDED, kv=payload("r", exp, layers),
                        lifecycle=P.Lifecycle(t_arrival=1.0), output_offset=offset)
        stage.take(P.decode(P.encode(h)))  # type: ignore[arg-type]
    enc.drop(["r"])
    out = [first]
    for step in range(n - 1):  # num_generated counts this run's tokens only: n - 1 passes
        tok = _decode_pass(dec, out[-1], 10 + step)
        out.append(tok.token)
        assert tok.finished == (step == n - 2)
    return out


def _decode_pass(stages: list[Any], last: int, pass_id: int) -> Any:
    sp = P.StagePass(pass_id=pass_id, stream=0, kind="decode", req_ids=("r",), tokens=(last,))
    hidden = None
    for stage in stages:
        stage.join(sp)
        out = stage.run(sp if hidden is None else P.StagePass(**{**sp.__dict__,
                                                                  "hidden": hidden}))
        hidden = out.hidden
    (tok,) = out.tokens
    return tok


@pytest.mark.parametrize("run", [whole_model, staged], ids=["whole_model", "staged"])
def test_a_seeded_rerun_continues_the_uninterrupted_draws(run: Any) -> None:
    full = run(PROMPT, N, 0)
    assert len(full) == N
    rerun = run(PROMPT + tuple(full[:K]), N - K, K)
    assert rerun == full[K:]


def test_the_tp_backends_continue_the_draws_too() -> None:
    """TPEncodeBackend (rank 0 samples after gathering the heads) and TPDecodeBackend, in a
    gloo group of one rank: their own sampling code, not the cross-rank traffic (the real
    tp_size 2 kill: tests/mesh/test_tp_rank_kill_real.py, slow)."""
    full = whole_model(PROMPT, N, 0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tp = init_tp_group(f"tcp://127.0.0.1:{port}", 0, 1, 30.0)
    enc = TPEncodeBackend(SPEC, tp, "float32")
    try:
        dec = TPDecodeBackend(SPEC, tp, "float32")
        rerun = whole_model(PROMPT + tuple(full[:K]), N - K, K, enc, dec)
    finally:
        enc.close()  # destroys the group
    assert rerun == full[K:]


def test_the_two_paths_agree_and_ignoring_the_offset_gives_other_tokens() -> None:
    full = whole_model(PROMPT, N, 0)
    assert staged(PROMPT, N, 0) == full
    params = SamplingParams(max_new_tokens=N, temperature=1.0, seed=SEEDED.seed, ignore_eos=True)
    assert list(generate(SPEC, [list(PROMPT)], params, dtype="float32")[0].token_ids) == full
    restarted = whole_model(PROMPT + tuple(full[:K]), N - K, 0)  # draws from position 0 again
    assert restarted != full[K:]
