"""Server limits answer with typed errors: prompt/output length, queue and per-client caps
(overloaded + a retry-after from the measured drain rate), deadlines and cancel."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from common import protocol as P
from common.backend import null_tokens
from common.client import AsyncClient
from common.errors import BadRequest, Cancelled, Overloaded, Timeout
from coordinator.admission import MAX_RETRY_S, DrainMeter, LogBudget, admit
from coordinator.config import CoordinatorConfig
from coordinator.launch import LaunchSpec, LocalMesh, WorkerGroup
from coordinator.requests import RequestTable

VOCAB = 256


def _cfg(**kw: int) -> CoordinatorConfig:
    return CoordinatorConfig(client_endpoint="tcp://127.0.0.1:1",
                             worker_endpoint="tcp://127.0.0.1:2", **kw)


def _submit(req_id: str) -> P.Submit:
    return P.Submit(req_id=req_id, prompt_ids=(1, 2), max_new_tokens=4)


def test_drain_meter_measures_answers_per_second_over_its_window() -> None:
    meter = DrainMeter(window_s=10.0)
    assert meter.rate() is None
    assert meter.seconds_for(5) == 10.0  # nothing measured: wait a window
    for second in range(21):
        meter.observe(float(second), 4 * second)  # 4 requests answered per second
    assert meter.rate() == pytest.approx(4.0)
    assert meter.seconds_for(8) == pytest.approx(2.0)
    assert meter.seconds_for(1e9) == MAX_RETRY_S
    assert len(meter._samples) <= 12  # noqa: SLF001 - bounded memory: the window only
    for second in range(21, 40):
        meter.observe(float(second), 80)  # stalled: nothing answered any more
    assert meter.rate() == 0.0 and meter.seconds_for(1) == 10.0


def test_queue_limit_retry_after_follows_the_drain_rate() -> None:
    table, meter = RequestTable(), DrainMeter()
    meter.observe(0.0, 0)
    meter.observe(2.0, 10)  # 5 answered per second
    cfg = _cfg(max_queued=3)
    for i in range(3):
        admit(_submit(f"r{i}"), f"c{i}".encode(), cfg, table, False, VOCAB, drain=meter)
    with pytest.raises(Overloaded, match="3 requests are queued") as over:
        admit(_submit("r3"), b"c9", cfg, table, False, VOCAB, drain=meter)
    assert over.value.retry_after_s == pytest.approx(0.2)  # one slot at 5/s
    table.remove("r0")
    admit(_submit("r3"), b"c9", cfg, table, False, VOCAB, drain=meter)


def test_per_client_limit_counts_only_that_clients_requests() -> None:
    table, meter = RequestTable(), DrainMeter()
    meter.observe(0.0, 0)
    meter.observe(1.0, 8)  # 8 answered per second
    cfg = _cfg(max_client_requests=2)
    admit(_submit("a0"), b"A", cfg, table, False, VOCAB, drain=meter)
    admit(_submit("a1"), b"A", cfg, table, False, VOCAB, drain=meter)
    for i in range(6):
        admit(_submit(f"b{i}"), f"B{i}".encode(), cfg, table, False, VOCAB, drain=meter)
    with pytest.raises(Overloaded, match="this client has 2 requests") as over:
        admit(_submit("a2"), b"A", cfg, table, False, VOCAB, drain=meter)
    # A holds 2 of 8 in flight: one of its requests is answered every 8 / 2 / 8 = 0.5 s
    assert over.value.retry_after_s == pytest.approx(0.5)
    table.remove("a0")
    assert table.num_for(b"A") == 1
    admit(_submit("a2"), b"A", cfg, table, False, VOCAB, drain=meter)
    assert table.num_for(b"A") == 2 and table.num_for(b"nobody") == 0


def test_log_budget_caps_lines_per_second_and_counts_the_rest() -> None:
    budget = LogBudget(per_second=3)
    first = [budget.allow(10.0 + i / 100) for i in range(10)]
    assert first == [0, 0, 0] + [None] * 7
    assert budget.allow(11.0) == 7  # the next second's first line reports what was skipped
    assert budget.allow(11.5) == 0


def test_config_rejects_bad_limits_and_half_curve_settings() -> None:
    with pytest.raises(ValueError, match="max_client_requests must be >= 1"):
        _cfg(max_client_requests=0)
    with pytest.raises(ValueError, match="need --curve-server-key"):
        CoordinatorConfig(client_endpoint="tcp://127.0.0.1:1",
                          worker_endpoint="tcp://127.0.0.1:2", curve_allow="/tmp")


@pytest.fixture(scope="module")
def small_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """One decoder with 2 slots, 20 ms per step: requests queue up behind it."""
    spec = LaunchSpec(groups=(WorkerGroup("encoder", 1), WorkerGroup("decoder", 1, capacity=2)),
                      runs_path=tmp_path_factory.mktemp("runs"), transport="ipc",
                      decode_cost_ms=20.0, heartbeat_interval_s=0.2, heartbeat_timeout_s=2.0,
                      drain_timeout_s=1.0,
                      coordinator_args=("--max-queued", "3", "--max-client-requests", "3",
                                        "--max-prompt-tokens", "16", "--max-new-tokens", "64"))
    local = LocalMesh(spec)
    local.start()
    yield local
    local.stop()


def test_length_limits_are_typed_errors(small_mesh: LocalMesh) -> None:
    async def run() -> None:
        async with AsyncClient(small_mesh.client_endpoint, default_timeout_s=20) as client:
            with pytest.raises(BadRequest, match="over the limit of 16"):
                await client.generate(prompt_ids=[1] * 17, max_new_tokens=4)
            with pytest.raises(BadRequest, match="max_new_tokens 65"):
                await client.generate(prompt_ids=[1], max_new_tokens=65)
            out = await client.generate(prompt_ids=[1] * 16, max_new_tokens=64)
            assert list(out.tokens) == null_tokens([1] * 16, 64, VOCAB)

    asyncio.run(run())


def test_overload_is_an_explicit_retry_after_and_admitted_requests_finish(
        small_mesh: LocalMesh) -> None:
    async def run() -> None:
        async with (AsyncClient(small_mesh.client_endpoint, default_timeout_s=30) as a,
                    AsyncClient(small_mesh.client_endpoint, default_timeout_s=30) as b):
            first = [asyncio.create_task(a.generate(prompt_ids=[i], max_new_tokens=40))
                     for i in range(3)]  # 2 decoding, 1 queued
            await asyncio.sleep(0.3)
            with pytest.raises(Overloaded, match="this client has 3") as mine:
                await a.generate(prompt_ids=[9], max_new_tokens=4)
            second = [asyncio.create_task(b.generate(prompt_ids=[10 + i], max_new_tokens=40))
                      for i in range(2)]  # queue: 3 (the limit)
            await asyncio.sleep(0.3)
            with pytest.raises(Overloaded, match="3 requests are queued") as full:
                await b.generate(prompt_ids=[9], max_new_tokens=4)
            for exc in (mine.value, full.value):
                assert exc.retry_after_s is not None and 0 < exc.retry_after_s <= MAX_RETRY_S
            outs = await asyncio.gather(*first, *second)
            prompts = [[0], [1], [2], [10], [11]]
            assert [list(o.tokens) for o in outs] == [null_tokens(p, 40, VOCAB) for p in prompts]
            again = await a.generate(prompt_ids=[9], max_new_tokens=4)  # room again
            assert list(again.tokens) == null_tokens([9], 4, VOCAB)

    asyncio.run(run())


def test_deadline_and_cancel_free_the_slots(small_mesh: LocalMesh) -> None:
    async def run() -> None:
        async with AsyncClient(small_mesh.client_endpoint, default_timeout_s=30) as client:
            with pytest.raises(Timeout):
                await client.generate(prompt_ids=[3], max_new_tokens=64, timeout_s=0.3)
            task = asyncio.create_task(client.generate(prompt_ids=[4], max_new_tokens=64,
                                                       req_id="to-cancel"))
            await asyncio.sleep(0.2)
            await client.cancel("to-cancel")
            with pytest.raises(Cancelled):
                await task
            await asyncio.sleep(0.3)
            stats = (await client.stats()).stats
            assert stats["requests"]["in_flight"] == 0
            assert all(w["active"] == 0 for w in stats["workers"] if w["role"] == "decoder")

    asyncio.run(run())
