"""Re-running an encoder-decoder (T5) request after a worker loss or a migration: in process.

The streamed tokens are decoder-side tokens, so a T5 re-run encodes the prompt alone and
*replays*: its first k tokens (what the client already has) are checked and dropped, the
stream continues at index k; a regenerated token that differs fails the request (never a
discontinuous stream). Decoder-only re-runs keep continuing from prompt + streamed tokens.
The real-process kill test is tests/mesh/test_t5_rerun_real.py.
"""

from __future__ import annotations

import pytest

from common import protocol as P
from coordinator.requests import ReplayMismatch, Request, RequestTable
from coordinator.server import Coordinator
from tests.runner.fakewaa import waa_coordinator
from tests.runner.test_pipeline_driver import Sock


def _request(table: RequestTable, req_id: str = "r", sampling: P.Sampling | None = None,
             max_new: int = 6) -> Request:
    request = Request(req_id=req_id, client=b"c", prompt=(4, 5), max_new_tokens=max_new,
                      sampling=sampling or P.Sampling(), stream=True, deadline=None)
    table.admit(request)
    table.dequeue(request)
    request.start_encode("enc0", "dec0")
    return request


def test_an_encoder_decoder_rerun_encodes_the_prompt_alone_and_replays() -> None:
    table = RequestTable(encoder_decoder=True)
    request = _request(table)
    assert request.add_tokens((7, 8, 9), now=1.0) == 0 and request.last_token == 9
    table.requeue(request)
    assert request.rerun_input() == ((4, 5), 6, 0)  # the prompt only, every token owed
    assert request.replaying == 3 and request.last_token is None
    assert request.add_tokens((7,), now=2.0) == 3 and request.tokens == [7, 8, 9]
    assert request.last_token == 7  # the re-run's own last token feeds its next step
    assert request.add_tokens((8, 9, 10), now=3.0) == 3  # 8, 9 replayed; 10 is new
    assert request.tokens == [7, 8, 9, 10] and request.replaying == 0
    assert request.times.t_tokens == [1.0, 1.0, 1.0, 3.0]  # a replayed token is not stamped
    assert request.last_token == 10 and not request.complete
    assert request.add_tokens((11, 12), now=4.0) == 4 and request.complete


def test_a_replayed_token_that_differs_is_an_error_not_a_stream() -> None:
    table = RequestTable(encoder_decoder=True)
    request = _request(table)
    request.add_tokens((7, 8, 9), now=1.0)
    table.requeue(request)
    request.add_tokens((7,), now=2.0)
    with pytest.raises(ReplayMismatch, match="regenerated token 5 at output index 1, where "
                                             "the client already has 8"):
        request.add_tokens((5, 9), now=2.0)
    assert request.tokens == [7, 8, 9]  # nothing of the diverged run was taken


def test_a_second_loss_during_the_replay_replays_again_from_the_prompt() -> None:
    table = RequestTable(encoder_decoder=True)
    request = _request(table)
    request.add_tokens((7, 8, 9), now=1.0)
    table.requeue(request)
    request.add_tokens((7, 8), now=2.0)  # mid-replay: the next decoder dies too
    table.requeue(request)
    assert request.wire_id == "r~rerun2" and request.rerun_input() == ((4, 5), 6, 0)
    assert request.replaying == 3
    assert request.add_tokens((7, 8, 9, 10), now=3.0) == 3 and request.tokens == [7, 8, 9, 10]


def test_a_migrated_request_replays_in_the_same_run() -> None:
    """A pipeline re-layout's migration (same wire id) replays as a worker-loss re-run does."""
    table = RequestTable(encoder_decoder=True)
    request = _request(table)
    request.add_tokens((7, 8), now=1.0)
    table.requeue_front(request)
    assert request.wire_id == "r" and request.rerun_input() == ((4, 5), 6, 0)
    assert request.add_tokens((7, 8, 3), now=2.0) == 2 and request.tokens == [7, 8, 3]


def test_a_decoder_only_rerun_still_continues_from_the_streamed_tokens() -> None:
    table = RequestTable()
    request = _request(table)
    request.add_tokens((7, 8), now=1.0)
    table.requeue(request)
    assert request.rerun_input() == ((4, 5, 7, 8), 4, 2) and request.replaying == 0
    assert request.last_token is None  # no token of the re-run yet
    assert request.add_tokens((3,), now=2.0) == 2 and request.last_token == 3
    table.requeue_front(request)
    assert request.rerun_input() == ((4, 5, 7, 8, 3), 3, 3)


def test_unseeded_sampling_of_an_encoder_decoder_model_gets_a_seed_at_admission() -> None:
    """The replay must draw what the lost run drew: a worker-chosen seed would be lost."""
    t5, llama = RequestTable(encoder_decoder=True), RequestTable()
    sampled = P.Sampling(temperature=0.8, top_k=5)
    a, b = _request(t5, "a", sampled), _request(t5, "b", sampled)
    assert a.sampling.seed is not None and a.sampling.seed != b.sampling.seed
    assert (a.sampling.temperature, a.sampling.top_k) == (0.8, 5)
    assert _request(t5, "g").sampling.seed is None  # greedy: nothing to pin
    assert _request(t5, "s", P.Sampling(temperature=1.0, seed=9)).sampling.seed == 9
    assert _request(llama, "l", sampled).sampling.seed is None  # decoder-only: unchanged


def _t5_mesh(decoders: list[str]) -> tuple[Coordinator, Sock, Sock]:
    """A serving WAA coordinator of the tiny-t5 shape: one encoder and ``decoders``."""
    return waa_coordinator({"enc0": None}, decoders, model_shape="tiny-t5")


def _tokens(co: Coordinator, decoder: str, wire_id: str, tokens: tuple[int, ...],
            finished: bool = False) -> None:
    co.members._dispatch(co.members.registry.get(decoder), P.DecodeTokens(
        worker_id=decoder, step=1, t_emitted=0.0, updates=(P.TokenUpdate(
            wire_id, tokens, finished=finished, finish_reason="length" if finished else None),)))
    co.relay.flush()


def _lose_holder(co: Coordinator, workers: Sock, max_new: int) -> tuple[str, str]:
    """Submit "a", stream two tokens from its decoder, kill that decoder; returns (lost
    decoder, the re-run's decoder) once the re-run's encode batch went out."""
    assert co.table.encoder_decoder
    co.on_submit(b"client", P.Submit(req_id="a", prompt=None, prompt_ids=(5, 6),
                                     max_new_tokens=max_new, stream=True))
    co.schedule()
    [(_, batch)] = workers.take(P.EncodeBatch)
    holder = batch.requests[0].decoder_id
    _tokens(co, holder, "a", (7,))
    _tokens(co, holder, "a", (8,))
    co.members.lose(co.members.registry.get(holder), "killed")
    co.schedule()
    [(_, rerun)] = workers.take(P.EncodeBatch)
    item = rerun.requests[0]
    assert (item.req_id, item.prompt_ids, item.max_new_tokens, item.output_offset) == (
        "a~rerun1", (5, 6), max_new, 0)  # the prompt alone: no decoder token as input
    return holder, item.decoder_id


def test_a_lost_t5_decoders_request_continues_gap_free_after_the_replay() -> None:
    co, workers, clients = _t5_mesh(["dec0", "dec1"])
    lost, survivor = _lose_holder(co, workers, 4)
    assert survivor != lost
    _tokens(co, survivor, "a", (9,))  # a token under the lost run's wire id: dropped
    _tokens(co, survivor, "a~rerun1", (7,))  # replayed: checked, not sent
    _tokens(co, survivor, "a~rerun1", (8, 9))  # 8 replayed, 9 new at index 2
    _tokens(co, survivor, "a~rerun1", (10,), finished=True)
    chunks = [(m.index, m.tokens) for _, m in clients.take(P.StreamChunk)]
    assert chunks == [(0, (7,)), (1, (8,)), (2, (9,)), (3, (10,))]
    [(_, result)] = clients.take(P.Result)
    assert list(result.tokens) == [7, 8, 9, 10] and not clients.take(P.Error)
    assert co.counters["rerun"] == 1 and co.counters["completed"] == 1


def test_a_t5_rerun_that_diverges_fails_the_request_with_the_reason() -> None:
    co, workers, clients = _t5_mesh(["dec0", "dec1"])
    _, survivor = _lose_holder(co, workers, 6)
    _tokens(co, survivor, "a~rerun1", (7, 3))  # 3 where the client has 8
    [(_, error)] = clients.take(P.Error)
    assert error.code == "worker_lost" and "where the client already has 8" in error.message
    assert [(m.index, m.tokens) for _, m in clients.take(P.StreamChunk)] == [(0, (7,)),
                                                                            (1, (8,))]
    assert not clients.take(P.Result) and "a" not in co.table
    assert co.counters["replay_mismatch"] == 1
    assert [c.req_id for _, c in workers.take(P.Cancel)][-1] == "a~rerun1"  # freed there


def test_a_pipeline_decode_pass_feeds_the_replaying_runs_own_last_token() -> None:
    """Pipeline drivers feed each request's last token to the next decode pass: for a
    replaying run that is the run's latest regenerated token, not the stream's last one."""
    from coordinator.pipeline_driver import _last_token

    table = RequestTable(encoder_decoder=True)
    request = _request(table)
    request.add_tokens((7, 8, 9), now=1.0)
    assert _last_token(request) == 9
    table.requeue_front(request)
    request.add_tokens((7,), now=2.0)  # the re-encode's first token (replayed)
    assert _last_token(request) == 7
    request.add_tokens((8,), now=3.0)
    assert _last_token(request) == 8
