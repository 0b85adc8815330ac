"""End to end over real processes and sockets (ipc:// and tcp://) with the null model."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from common import protocol as P
from common.backend import null_tokens
from common.client import AsyncClient, Client
from common.errors import BadRequest
from coordinator.launch import LaunchSpec, LocalMesh, WorkerGroup
from tests.mesh.rawclient import random_work, raw_roundtrip

VOCAB = 256  # tiny-llama
ORDER = ("t_arrival", "t_queued", "t_encode_start", "t_encode_end", "t_kv_sent",
         "t_kv_received", "t_first_token", "t_finish")


@pytest.fixture(scope="module", params=["ipc", "tcp"])
def mesh(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
         ) -> Iterator[LocalMesh]:
    spec = LaunchSpec(groups=(WorkerGroup("encoder", 2), WorkerGroup("decoder", 2, capacity=300)),
                      runs_path=tmp_path_factory.mktemp("runs"), transport=request.param,
                      model_shape="tiny-llama", encode_batch=32)
    local = LocalMesh(spec, startup_timeout_s=60)
    local.start()
    yield local
    assert local.stop() == []  # every process left on its own (no SIGKILL needed)
    assert all(c.poll() == 0 for c in local.children), [c.describe_exit()
                                                         for c in local.children]


def test_every_request_answered_exactly_once_with_its_tokens_in_order(mesh: LocalMesh) -> None:
    n = 1000 if mesh.spec.transport == "ipc" else 500
    work = random_work(n, seed=1, vocab=VOCAB)
    got = raw_roundtrip(mesh.client_endpoint, work)
    for req_id, prompt, max_new in work:
        msgs = got[req_id]
        want = null_tokens(prompt, max_new, VOCAB)
        assert isinstance(msgs[-1], P.Result), msgs[-1]
        assert [type(m) for m in msgs[:-1]] == [P.StreamChunk] * (len(msgs) - 1)
        streamed: list[int] = []
        for chunk in msgs[:-1]:
            assert chunk.index == len(streamed)  # type: ignore[attr-defined]
            streamed.extend(chunk.tokens)  # type: ignore[attr-defined]
        assert streamed == list(msgs[-1].tokens) == want
        _check_lifecycle(msgs[-1], max_new)


def _check_lifecycle(result: P.Result, num_tokens: int) -> None:
    life = result.lifecycle
    stamps = [getattr(life, name) for name in ORDER]
    assert None not in stamps, life
    assert stamps == sorted(stamps), life
    assert len(life.t_tokens) == num_tokens and life.t_tokens[0] == life.t_first_token
    assert result.finish_reason == "length"


def test_sdk_streams_and_generates_concurrently(mesh: LocalMesh) -> None:
    work = random_work(300, seed=2, vocab=VOCAB)

    async def run() -> None:
        async with AsyncClient(mesh.client_endpoint, default_timeout_s=60) as client:
            async def one(prompt: tuple[int, ...], n: int, stream: bool) -> list[int]:
                if not stream:
                    return list((await client.generate(prompt_ids=prompt,
                                                       max_new_tokens=n)).tokens)
                tokens: list[int] = []
                async with client.stream(prompt_ids=prompt, max_new_tokens=n) as s:
                    async for chunk in s:
                        tokens.extend(chunk.tokens)
                return tokens
            outs = await asyncio.gather(*(one(p, n, i % 2 == 0)
                                          for i, (_, p, n) in enumerate(work)))
            for (_, prompt, n), tokens in zip(work, outs, strict=True):
                assert tokens == null_tokens(prompt, n, VOCAB)
            stats = (await client.stats()).stats
            assert stats["requests"]["in_flight"] == 0
            assert {w["worker_id"] for w in stats["workers"]} == {"enc0", "enc1", "dec0", "dec1"}

    asyncio.run(run())


def test_malformed_frames_get_errors_while_others_are_served(mesh: LocalMesh) -> None:
    bad_inputs: list[list[bytes]] = [
        [b"junk"],                                   # one frame
        [b"\x99", b"\x80"],                          # unknown type
        [bytes([P.Submit.TYPE]), b"\xc1"],          # invalid msgpack
        [bytes([P.Submit.TYPE]), P.encode(P.Submit(req_id="x", prompt_ids=(1,)))[1], b"extra"],
        [bytes([P.Submit.TYPE]), b"\x82\xa1v\x01\xa6req_id\xa3bad"],  # missing fields
        [bytes([P.Result.TYPE]), P.encode(P.Result(req_id="r", tokens=(),
                                                   finish_reason="stop"))[1]],  # wrong direction
    ]
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.DEALER)
    rogue.setsockopt(zmq.RCVTIMEO, 10_000)
    rogue.connect(mesh.client_endpoint)
    work = random_work(100, seed=3, vocab=VOCAB)

    async def good_client() -> None:
        async with AsyncClient(mesh.client_endpoint, default_timeout_s=60) as client:
            outs = await asyncio.gather(*(client.generate(prompt_ids=p, max_new_tokens=n)
                                          for _, p, n in work))
        for (_, prompt, n), out in zip(work, outs, strict=True):
            assert list(out.tokens) == null_tokens(prompt, n, VOCAB)

    for frames in bad_inputs:
        rogue.send_multipart(frames)
    asyncio.run(good_client())
    errors = [P.decode(rogue.recv_multipart()) for _ in bad_inputs]
    assert all(isinstance(e, P.Error) for e in errors), errors
    assert [e.code for e in errors] == ["protocol_error"] * 5 + ["bad_request"]  # type: ignore[attr-defined]
    assert errors[4].req_id == "bad"  # type: ignore[attr-defined]
    rogue.close(linger=0)
    ctx.term()


def test_bad_requests_are_refused_with_typed_errors(mesh: LocalMesh) -> None:
    with Client(mesh.client_endpoint, default_timeout_s=30) as client:
        with pytest.raises(BadRequest, match="outside the vocabulary"):
            client.generate(prompt_ids=[VOCAB + 5], max_new_tokens=3)
        with pytest.raises(BadRequest, match="prompt_ids"):
            client.generate("a text prompt", max_new_tokens=3)
        assert list(client.generate(prompt_ids=[3], max_new_tokens=2).tokens) == null_tokens(
            [3], 2, VOCAB)


def test_real_sized_kv_crosses_from_encoder_to_decoder(tmp_path: Path) -> None:
    """smollm2-135m shape: a 300-token prompt hands over 6.9 MB of bf16 KV."""
    spec = LaunchSpec(groups=(WorkerGroup("encoder", 1), WorkerGroup("decoder", 1)),
                      runs_path=tmp_path, transport="ipc", model_shape="smollm2-135m")
    with LocalMesh(spec) as local, Client(local.client_endpoint, default_timeout_s=60) as client:
        prompt = list(range(1000, 1300))
        result = client.generate(prompt_ids=prompt, max_new_tokens=5)
        assert list(result.tokens) == null_tokens(prompt, 5, 49152)
        assert result.lifecycle.t_kv_received is not None


def test_tp_groups_register_every_rank_and_serve(tmp_path: Path) -> None:
    """Decoder group of tp_size 2 (tiny-llama: 2 KV heads) behind a tp_size-1 encoder."""
    spec = LaunchSpec(groups=(WorkerGroup("encoder", 1), WorkerGroup("decoder", 1, tp_size=2)),
                      runs_path=tmp_path, transport="ipc", model_shape="tiny-llama")
    with LocalMesh(spec) as local, Client(local.client_endpoint, default_timeout_s=60) as client:
        outs = [client.generate(prompt_ids=[i, 7], max_new_tokens=6) for i in range(5)]
        assert [list(o.tokens) for o in outs] == [null_tokens([i, 7], 6, VOCAB)
                                                  for i in range(5)]
        workers = {w["worker_id"]: w for w in client.stats().stats["workers"]}
        assert set(workers) == {"enc0", "dec0.r0", "dec0.r1"}
        assert (workers["dec0.r1"]["tp_rank"], workers["dec0.r1"]["tp_size"]) == (1, 2)


@pytest.mark.slow
def test_thousands_of_concurrent_streams_over_tcp(tmp_path: Path) -> None:
    spec = LaunchSpec(groups=(WorkerGroup("encoder", 2), WorkerGroup("decoder", 3, capacity=2000)),
                      runs_path=tmp_path, transport="tcp", model_shape="tiny-llama",
                      encode_batch=64, decode_cost_ms=2.0)
    work = random_work(5000, seed=4, vocab=VOCAB)
    with LocalMesh(spec) as local:
        got = raw_roundtrip(local.client_endpoint, work)
    for req_id, prompt, max_new in work:
        final = got[req_id][-1]
        assert isinstance(final, P.Result) and list(final.tokens) == null_tokens(prompt, max_new,
                                                                                 VOCAB)
        streamed = [t for m in got[req_id][:-1] for t in m.tokens]  # type: ignore[attr-defined]
        assert streamed == list(final.tokens)
