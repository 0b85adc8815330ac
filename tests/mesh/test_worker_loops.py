"""Worker compute loops without sockets: a fake link records what they would send."""

from __future__ import annotations

import queue
from typing import Any

from common import protocol as P
from common.backend import EncodeItem, NullDecodeBackend, NullEncodeBackend, NullShape, null_tokens
from common.models.config import ModelConfig
from common.workerconfig import WorkerConfig
from common.workerlink import Stop
from decoder_worker.worker import DecoderLoop
from encoder_worker.worker import EncoderLoop

MODEL = ModelConfig.preset("tiny-llama")


class IdleStops(queue.Queue):  # type: ignore[type-arg]
    """An inbox that says "stop" when a loop would block on it (nothing left to do)."""

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        try:
            return super().get(block=False)
        except queue.Empty:
            if block:
                return Stop("idle", error=False)
            raise


class FakeLink:
    def __init__(self) -> None:
        self.inbox: queue.Queue[Any] = IdleStops()
        self.sent: list[tuple[P.Message, str | None]] = []
        self.congested = False
        self.load: Any = dict
        self.limited = Log()  # the link's rate-limited logger

    def send(self, msg: P.Message, decoder_id: str | None = None) -> None:
        self.sent.append((msg, decoder_id))


class Log:
    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


def _cfg(role: str, **kw: Any) -> WorkerConfig:
    return WorkerConfig(role=role, coordinator="ipc:///x", worker_id=f"{role[:3]}0",
                        kv_bind="ipc:///kv" if role == "decoder" else None, **kw)


def test_encoder_hands_kv_to_the_chosen_decoder_and_reports_the_batch() -> None:
    link = FakeLink()
    shape = NullShape(MODEL)
    loop = EncoderLoop(_cfg("encoder"), link, NullEncodeBackend(shape), shape, Log())  # type: ignore[arg-type]
    reqs = tuple(P.EncodeRequest(req_id=f"r{i}", prompt_ids=(i + 1, 2), max_new_tokens=4,
                                 decoder_id=f"dec{i % 2}",
                                 lifecycle=P.Lifecycle(t_arrival=1.0)) for i in range(3))
    link.inbox.put(P.Cancel(req_id="r2"))
    link.inbox.put(P.EncodeBatch(batch_id=7, requests=reqs))
    assert loop.run() == 0
    handoffs = [(m, d) for m, d in link.sent if isinstance(m, P.KVHandoff)]
    assert [(m.req_id, d) for m, d in handoffs] == [("r0", "dec0"), ("r1", "dec1")]  # r2 cancelled
    first = handoffs[0][0]
    assert first.first_token == null_tokens((1, 2), 1, MODEL.vocab_size)[0]
    assert first.kv.tensors["k"].shape == (MODEL.num_layers, MODEL.kv_heads, 2, MODEL.head_dim)
    life = first.lifecycle
    assert life.t_arrival == 1.0 and life.t_encode_start <= life.t_encode_end <= life.t_kv_sent  # type: ignore[operator]
    beat = link.sent[-1][0]
    assert isinstance(beat, P.Heartbeat) and beat.load["batches_done"] == 1


def _handoff(req_id: str, prompt: tuple[int, ...], max_new: int) -> P.KVHandoff:
    shape = NullShape(MODEL)
    out = NullEncodeBackend(shape).encode([EncodeItem(req_id, prompt, max_new)])[0]
    return P.KVHandoff(req_id=req_id, encoder_id="enc0", first_token=out.first_token,
                       prompt_len=len(prompt), max_new_tokens=max_new, sampling=P.Sampling(),
                       kv=P.KVPayload(req_id=req_id, seq_len=len(prompt), layer_start=0,
                                      layer_end=MODEL.num_layers, head_start=0,
                                      head_end=MODEL.kv_heads, num_kv_heads=MODEL.kv_heads,
                                      tensors=out.kv))


def _run_decoder(link: FakeLink, cfg: WorkerConfig) -> dict[str, list[int]]:
    loop = DecoderLoop(cfg, link, NullDecodeBackend(NullShape(MODEL)), Log())  # type: ignore[arg-type]
    loop.run()
    tokens: dict[str, list[int]] = {}
    for msg, _ in link.sent:
        assert isinstance(msg, P.DecodeTokens)
        for update in msg.updates:
            tokens.setdefault(update.req_id, []).extend(update.tokens)
    return tokens


def test_decoder_streams_every_token_once_in_order() -> None:
    link = FakeLink()
    link.inbox.put(_handoff("a", (5, 6), 7))
    link.inbox.put(_handoff("b", (9,), 1))  # the encode pass's token is the whole output
    got = _run_decoder(link, _cfg("decoder", publish_interval_ms=0.0))
    assert got == {"a": null_tokens((5, 6), 7, MODEL.vocab_size),
                   "b": null_tokens((9,), 1, MODEL.vocab_size)}
    first = link.sent[0][0].updates  # type: ignore[attr-defined]
    assert all(u.lifecycle is not None and u.lifecycle.t_kv_received for u in first)
    finals = [u for m, _ in link.sent for u in m.updates if u.finished]  # type: ignore[attr-defined]
    assert sorted(u.req_id for u in finals) == ["a", "b"]


def test_congestion_merges_tokens_into_fewer_updates() -> None:
    link = FakeLink()
    link.congested = True
    link.inbox.put(_handoff("a", (5, 6), 30))
    got = _run_decoder(link, _cfg("decoder", publish_interval_ms=0.0))
    assert got == {"a": null_tokens((5, 6), 30, MODEL.vocab_size)}
    updates = [u for m, _ in link.sent for u in m.updates]  # type: ignore[attr-defined]
    assert len(updates) == 2  # the first token at once, everything else with the last


def test_a_cancelled_sequence_sends_nothing_more() -> None:
    link = FakeLink()
    link.inbox.put(_handoff("a", (1,), 50))
    link.inbox.put(P.Cancel(req_id="a"))
    assert _run_decoder(link, _cfg("decoder")) == {}
