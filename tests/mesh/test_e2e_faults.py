"""Failures through the real mesh: cancel, deadlines, a SIGKILLed worker, a startup crash."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.backend import null_tokens
from common.client import AsyncClient, Client
from common.errors import Cancelled, Timeout, WorkerLost
from common.procs import StartupError
from coordinator.launch import LaunchSpec, LocalMesh, WorkerGroup

VOCAB = 256


@pytest.fixture(scope="module")
def slow_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """10 ms per decode iteration; heartbeats fast enough to notice a death within ~1 s."""
    spec = LaunchSpec(groups=(WorkerGroup("encoder", 1), WorkerGroup("decoder", 2)),
                      runs_path=tmp_path_factory.mktemp("runs"), transport="ipc",
                      model_shape="tiny-llama", decode_cost_ms=10.0,
                      heartbeat_interval_s=0.2, heartbeat_timeout_s=1.5, drain_timeout_s=2.0)
    local = LocalMesh(spec)
    local.start()
    yield local
    local.stop()


def test_cancel_stops_a_stream_and_frees_the_decoder(slow_mesh: LocalMesh) -> None:
    async def run() -> None:
        async with AsyncClient(slow_mesh.client_endpoint, default_timeout_s=30) as client:
            got = 0
            async with client.stream(prompt_ids=[1, 2], max_new_tokens=2000) as stream:
                async for chunk in stream:
                    got += len(chunk.tokens)
                    if got >= 3:
                        break  # leaving the stream early sends Cancel
            waiting = asyncio.create_task(client.generate(prompt_ids=[3], max_new_tokens=2000,
                                                          req_id="cancel-me"))
            await asyncio.sleep(0.3)
            await client.cancel("cancel-me")
            with pytest.raises(Cancelled):
                await waiting
            await asyncio.sleep(0.3)
            stats = (await client.stats()).stats
            assert stats["requests"]["in_flight"] == 0
            assert stats["requests"]["failed"] >= 2
            assert all(w["active"] == 0 for w in stats["workers"] if w["role"] == "decoder")

    asyncio.run(run())


def test_a_deadline_answers_with_timeout(slow_mesh: LocalMesh) -> None:
    with Client(slow_mesh.client_endpoint) as client:
        t0 = time.monotonic()
        with pytest.raises(Timeout):
            client.generate(prompt_ids=[4], max_new_tokens=5000, timeout_s=0.5)
        assert time.monotonic() - t0 < 3


def test_a_sigkilled_decoders_requests_are_rerun_on_the_other(slow_mesh: LocalMesh) -> None:
    """Raw-wire checks of the re-run (no duplicate, no gap): test_worker_loss.py."""
    victim = next(c for c in slow_mesh.workers if c.name == "decoder-dec0")
    prompts = [(i, i + 1) for i in range(40)]

    async def run() -> dict[str, int]:
        outcome = {"ok": 0, "lost": 0}
        async with AsyncClient(slow_mesh.client_endpoint, default_timeout_s=30) as client:
            async def one(prompt: tuple[int, int]) -> None:
                try:
                    out = await client.generate(prompt_ids=prompt, max_new_tokens=300)
                except WorkerLost as exc:
                    assert "dec0" in str(exc)
                    outcome["lost"] += 1
                else:
                    assert list(out.tokens) == null_tokens(prompt, 300, VOCAB)
                    outcome["ok"] += 1

            tasks = [asyncio.create_task(one(p)) for p in prompts]
            await asyncio.sleep(0.8)  # all running, ~3 s of decoding left
            os.kill(victim.pid, signal.SIGKILL)
            t0 = time.monotonic()
            await asyncio.gather(*tasks)
            assert time.monotonic() - t0 < 6  # detection is the heartbeat deadline, not a hang
            after = await client.generate(prompt_ids=[9, 9], max_new_tokens=5)
            assert list(after.tokens) == null_tokens([9, 9], 5, VOCAB)
        return outcome

    outcome = asyncio.run(run())
    assert outcome == {"ok": len(prompts), "lost": 0}


def test_a_worker_crashing_at_startup_fails_the_launch_fast(tmp_path: Path) -> None:
    """smollm2-135m has 3 KV heads: decoder ranks of tp_size 2 cannot split them."""
    spec = LaunchSpec(groups=(WorkerGroup("encoder", 1), WorkerGroup("decoder", 1, tp_size=2)),
                      runs_path=tmp_path, transport="ipc", model_shape="smollm2-135m")
    local = LocalMesh(spec, startup_timeout_s=60)
    t0 = time.monotonic()
    with pytest.raises(StartupError, match="do not split over tp_size 2") as err:
        local.start()
    assert time.monotonic() - t0 < 20
    assert "decoder-dec0.r" in str(err.value)
    assert all(c.poll() is not None for c in local.children)


@pytest.fixture(scope="module")
def two_encoders(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """Encoding is slow (0.5 s per batch) so a batch can be caught inside an encoder."""
    spec = LaunchSpec(groups=(WorkerGroup("encoder", 2), WorkerGroup("decoder", 1)),
                      runs_path=tmp_path_factory.mktemp("runs"), transport="tcp",
                      model_shape="tiny-llama", encode_cost_ms=500.0, encode_batch=4,
                      decode_cost_ms=10.0, heartbeat_interval_s=0.2, heartbeat_timeout_s=1.5,
                      drain_timeout_s=2.0, worker_args=("--startup-timeout", "8"))
    local = LocalMesh(spec)
    local.start()
    yield local
    local.stop()


async def _outcomes(endpoint: str, prompts: list[list[int]], max_new: int,
                    during: object) -> dict[str, int]:
    counts: dict[str, int] = {}
    async with AsyncClient(endpoint, default_timeout_s=30) as client:
        async def one(prompt: list[int]) -> None:
            try:
                out = await client.generate(prompt_ids=prompt, max_new_tokens=max_new)
                assert list(out.tokens) == null_tokens(prompt, max_new, VOCAB)
                key = "ok"
            except WorkerLost as exc:
                key = f"lost:{str(exc).split('worker ')[1].split(' ')[0]}"
            counts[key] = counts.get(key, 0) + 1

        tasks = [asyncio.create_task(one(p)) for p in prompts]
        await during()  # type: ignore[operator]
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=20)
    return counts


def test_a_sigkilled_encoders_batch_is_encoded_again(two_encoders: LocalMesh) -> None:
    enc0 = next(c for c in two_encoders.workers if c.name == "encoder-enc0")

    async def kill_mid_batch() -> None:
        await asyncio.sleep(0.25)  # first batches are inside both encoders
        os.kill(enc0.pid, signal.SIGKILL)

    counts = asyncio.run(_outcomes(two_encoders.client_endpoint,
                                   [[i] for i in range(8)], 20, kill_mid_batch))
    assert counts == {"ok": 8}, counts  # the survivor re-ran what enc0 held


def test_a_silent_decoder_is_detected_and_then_rejoins_fresh(two_encoders: LocalMesh) -> None:
    dec0 = next(c for c in two_encoders.workers if c.name == "decoder-dec0")

    async def freeze() -> None:
        await asyncio.sleep(1.5)  # encoded (0.5 s per batch on the survivor) and decoding
        os.kill(dec0.pid, signal.SIGSTOP)

    try:
        counts = asyncio.run(_outcomes(two_encoders.client_endpoint,
                                       [[i, 1] for i in range(4)], 1000, freeze))
    finally:
        os.kill(dec0.pid, signal.SIGCONT)
    assert counts == {"lost:dec0": 4}
    # woken, it learns it was declared lost, drops the 4 sequences and registers again
    deadline = time.monotonic() + 10
    with Client(two_encoders.client_endpoint) as client:
        while time.monotonic() < deadline:
            workers = {w["worker_id"]: w for w in client.stats().stats["workers"]}
            if workers.get("dec0", {}).get("state") == "ready":
                break
            time.sleep(0.2)
        assert workers["dec0"]["state"] == "ready" and workers["dec0"]["active"] == 0
        out = client.generate(prompt_ids=[5, 5], max_new_tokens=8)
        assert list(out.tokens) == null_tokens([5, 5], 8, VOCAB)
    assert dec0.poll() is None
    log = (two_encoders.spec.run_dir / "decoder-dec0.jsonl").read_text()
    assert '"dropping_all"' in log and '"rejoined"' in log


def test_workers_wait_for_a_dead_coordinator_then_exit(two_encoders: LocalMesh) -> None:
    """Past the heartbeat deadline a worker re-registers (a restart would take it back:
    test_coordinator_restart.py); with no coordinator for --startup-timeout it exits 1."""
    assert two_encoders.coordinator is not None
    alive = [c for c in two_encoders.workers if c.poll() is None]
    assert alive
    os.kill(two_encoders.coordinator.pid, signal.SIGKILL)
    t0 = time.monotonic()
    time.sleep(3.0)  # past the 1.5 s heartbeat deadline: rejoining, not exiting
    assert [c.poll() for c in alive] == [None] * len(alive)
    deadline = time.monotonic() + 20
    while any(c.poll() is None for c in alive) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [c.poll() for c in alive] == [1] * len(alive)  # gave up: exit 1
    assert time.monotonic() - t0 > 8
    assert all("coordinator gone" in c.stderr_tail() for c in alive)
