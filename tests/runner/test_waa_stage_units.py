"""Staged WAA stage backends and the decoder stage's loop, in one process (no sockets): KV
exported per layer range by an encoder stage and assembled by decoder stages with another
split gives the whole model's tokens; late KV of a freed request is dropped; a decode pass
whose KV never comes fails after the wait instead of hanging."""

from __future__ import annotations

import queue
import types
from typing import Any

import pytest
import torch

from common import protocol as P
from common.backend_stage_engine import EngineStageBackend
from common.backend_waa_stage import WaaDecoderStage, WaaEncoderStage, payload
from common.models.registry import load_model_spec
from decoder_worker import waa_stage

torch.set_num_threads(1)
SPEC = load_model_spec("tiny-llama", seed=4)  # 2 layers
PROMPTS = {"a": (5, 6, 7, 8, 9), "b": (11, 12)}
GREEDY = P.Sampling(temperature=0.0)


def _encode_pass(pass_id: int = 1) -> P.StagePass:
    reqs = tuple(P.EncodeRequest(req_id=r, prompt_ids=p, max_new_tokens=6, sampling=GREEDY)
                 for r, p in PROMPTS.items())
    return P.StagePass(pass_id=pass_id, stream=0, kind="encode", req_ids=tuple(PROMPTS),
                       requests=reqs)


def _handoff(enc: WaaEncoderStage, req_id: str, layers: tuple[int, int],
             arrival: float = 1.0) -> P.KVHandoff:
    exp = enc.export_batch([req_id], 0)[req_id]
    return P.KVHandoff(req_id=req_id, encoder_id="enc0", first_token=-1,
                       prompt_len=len(PROMPTS[req_id]), max_new_tokens=6, sampling=GREEDY,
                       kv=payload(req_id, exp, layers),
                       lifecycle=P.Lifecycle(t_arrival=arrival))


def _decode(stages: list[Any], tokens: dict[str, int], stream: int, pass_id: int) -> list[int]:
    sp = P.StagePass(pass_id=pass_id, stream=stream, kind="decode", req_ids=tuple(tokens),
                     tokens=tuple(tokens.values()))
    hidden = None
    for stage in stages:
        if isinstance(stage, WaaDecoderStage):
            stage.join(sp)
        out = stage.run(sp if hidden is None else P.StagePass(**{**sp.__dict__,
                                                                  "hidden": hidden}))
        hidden = out.hidden
    return [t.token for t in out.tokens]


def test_kv_split_by_layers_decodes_like_the_whole_model() -> None:
    ref = EngineStageBackend(SPEC, dtype="float32")
    want_first = {t.req_id: t.token for t in ref.run(_encode_pass()).tokens}
    enc = WaaEncoderStage(SPEC, (0, 2), dtype="float32")
    dec = [WaaDecoderStage(SPEC, (0, 1), dtype="float32"),
           WaaDecoderStage(SPEC, (1, 2), dtype="float32")]
    first = {t.req_id: t.token for t in enc.run(_encode_pass()).tokens}
    assert first == want_first
    for r in PROMPTS:  # encoder layers [0, 2) -> decoder stage 0 gets [0, 1), stage 1 [1, 2)
        dec[1].take(_handoff(enc, r, (1, 2)))
        assert dec[1].complete(r) and not dec[0].complete(r)
        dec[0].take(_handoff(enc, r, (0, 1)))
    enc.drop(list(PROMPTS))
    assert enc.num_active == 0 and dec[0].num_active == 2
    last = dict(first)
    for step in range(3):  # micro-batch 1 here; the reference runs stream 0
        want = _decode([ref], last, 0, 10 + step)
        got = _decode(dec, last, 1, 20 + step)
        assert got == want
        last = dict(zip(last, got, strict=True))
    assert all(d.seqs[r].num_generated == 4 for d in dec[1:] for r in PROMPTS)


def test_late_kv_of_a_freed_request_is_dropped_a_reused_id_is_not() -> None:
    enc = WaaEncoderStage(SPEC, (0, 2), dtype="float32")
    dec = WaaDecoderStage(SPEC, (0, 1), dtype="float32")
    enc.run(_encode_pass())
    dec.take(_handoff(enc, "a", (0, 1)))
    dec.drop(["a", "b"])  # "a" pending, "b" not here yet: both remembered
    dec.take(_handoff(enc, "b", (0, 1)))
    dec.take(_handoff(enc, "a", (0, 1)))  # the freed run's duplicate
    assert dec.pending == {} and dec.num_active == 0
    dec.take(_handoff(enc, "a", (0, 1), arrival=2.0))  # a new request under the same id
    assert dec.complete("a")
    with pytest.raises(ValueError, match="does not touch"):
        WaaDecoderStage(SPEC, (1, 2), dtype="float32").take(_handoff(enc, "a", (0, 1)))


class Quiet:
    """A logger that drops everything."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


class FakeLink:
    """What a stage loop uses of a WorkerLink: the inbox, send, and its loggers."""

    def __init__(self) -> None:
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.sent: list[P.Message] = []
        self.load: Any = dict
        self.limited = Quiet()

    def send(self, msg: P.Message, decoder_id: str | None = None) -> None:
        self.sent.append(msg)


def test_a_decode_pass_whose_kv_never_comes_fails_after_the_wait(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(waa_stage, "KV_WAIT_S", 0.3)
    enc = WaaEncoderStage(SPEC, (0, 2), dtype="float32")
    dec = WaaDecoderStage(SPEC, (0, 2), dtype="float32")
    link = FakeLink()
    cfg = types.SimpleNamespace(worker_id="dec0", stage=1)
    loop = waa_stage.DecoderStageLoop(cfg, link, dec, Quiet())  # type: ignore[arg-type]
    first = {t.req_id: t.token for t in enc.run(_encode_pass()).tokens}
    link.inbox.put(_handoff(enc, "a", (0, 2)))  # "b" never comes
    other = P.StagePass(pass_id=8, stream=0, kind="decode", req_ids=("a",),
                        tokens=(first["a"],))
    link.inbox.put(other)  # arrives while the pass waits: runs after it
    loop.run_pass(P.StagePass(pass_id=7, stream=0, kind="decode", req_ids=("a", "b"),
                              tokens=(first["a"], first["b"])))
    done = link.sent[-1]
    assert isinstance(done, P.PassDone) and done.pass_id == 7
    assert done.error is not None and "did not arrive" in done.error and "'b'" in done.error
    assert list(loop.later) == [other] and dec.num_active == 0  # "a" dropped with the pass
