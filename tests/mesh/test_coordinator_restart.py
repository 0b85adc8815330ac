"""kill -9 the coordinator mid-run and start it again on the same endpoints: the worker
processes live on, drop what they held, re-register with the new instance, and serve; clients
get CoordinatorLost for the requests in flight (at once, not at their timeout) and a retry on
the same client object succeeds with the right tokens. WAA and a 2-stage pipeline plan."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.backend import null_tokens
from common.client import AsyncClient
from common.errors import CoordinatorLost
from coordinator.launch import LaunchSpec, LocalMesh, WorkerGroup
from tests.mesh.meshctl import log_events, restart_coordinator

VOCAB = 256
FAST = {"heartbeat_interval_s": 0.25, "heartbeat_timeout_s": 5.0, "drain_timeout_s": 1.0}


@pytest.fixture(params=["waa", "rra"])
def mesh(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LocalMesh]:
    if request.param == "waa":
        spec = LaunchSpec(groups=(WorkerGroup("encoder", 1), WorkerGroup("decoder", 2)),
                          runs_path=tmp_path, transport="tcp", model_shape="tiny-llama",
                          decode_cost_ms=10.0, **FAST)  # type: ignore[arg-type]
    else:
        spec = LaunchSpec(groups=(WorkerGroup("pipeline", 1), WorkerGroup("pipeline", 1)),
                          runs_path=tmp_path, transport="ipc", model_shape="tiny-llama",
                          policy="rra", n_d=4, decode_cost_ms=5.0, **FAST)  # type: ignore[arg-type]
    with LocalMesh(spec) as local:
        yield local


async def _stream(client: AsyncClient, prompt: tuple[int, ...], max_new: int,
                  got: list[int]) -> None:
    async with client.stream(prompt_ids=prompt, max_new_tokens=max_new) as stream:
        async for chunk in stream:
            assert chunk.index == len(got)  # the SDK hands out each position once, in order
            got.extend(chunk.tokens)


async def _run(mesh: LocalMesh) -> None:
    prompts = [(i, i + 2, 7) for i in range(12)]
    max_new = 400
    async with AsyncClient(mesh.client_endpoint, default_timeout_s=60) as client:
        before = (await client.stats()).stats["instance"]
        got: list[list[int]] = [[] for _ in prompts]
        tasks = [asyncio.create_task(_stream(client, p, max_new, g))
                 for p, g in zip(prompts, got, strict=True)]
        await asyncio.sleep(1.0)  # every request is streaming
        assert all(g for g in got), "requests should be streaming before the kill"
        pids = [c.pid for c in mesh.workers]
        loop = asyncio.get_running_loop()
        restart = loop.run_in_executor(None, restart_coordinator, mesh, 60.0, 0.5)
        t0 = time.monotonic()
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        assert time.monotonic() - t0 < 5, "the SDK must notice the drop, not wait for a timeout"
        assert all(isinstance(o, CoordinatorLost) for o in outcomes), outcomes
        for prompt, tokens in zip(prompts, got, strict=True):  # a clean prefix, no duplicate
            assert 0 < len(tokens) < max_new
            assert tokens == null_tokens(prompt, max_new, VOCAB)[:len(tokens)]
        await restart
        assert [c.pid for c in mesh.workers] == pids and all(c.poll() is None
                                                           for c in mesh.workers)
        stats = (await client.stats()).stats
        assert stats["instance"] != before
        # what the workers held before the restart is gone (KV freed)
        assert all(w["load"].get("active", 0) == 0 for w in stats["workers"]), stats["workers"]
        retried = await asyncio.gather(*(client.generate(prompt_ids=p, max_new_tokens=60)
                                         for p in prompts))
        for prompt, result in zip(prompts, retried, strict=True):
            assert list(result.tokens) == null_tokens(prompt, 60, VOCAB)


def test_a_restarted_coordinator_serves_the_same_workers(mesh: LocalMesh) -> None:
    asyncio.run(_run(mesh))
    rejoined = log_events(mesh.spec.run_dir, "", "rejoined")
    assert len(rejoined) == len(mesh.workers)  # each worker re-registered exactly once
