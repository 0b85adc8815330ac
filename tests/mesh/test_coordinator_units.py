"""Coordinator pieces without sockets: request table, batching and placement, registry."""

from __future__ import annotations

import pytest

from common import protocol as P
from common.errors import BadRequest, Overloaded, ShuttingDown
from coordinator.admission import admit
from coordinator.batching import pick_encoder, place_batch
from coordinator.config import CoordinatorConfig
from coordinator.registry import Registry, WorkerInfo, WorkerState, group_stem
from coordinator.requests import Request, RequestTable, State


def _request(req_id: str) -> Request:
    return Request(req_id=req_id, client=b"c", prompt=(1, 2), max_new_tokens=3,
                   sampling=P.Sampling(), stream=True, deadline=None)


def _worker(worker_id: str, role: str, capacity: int = 4, active: int = 0) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, role=role, routing_id=worker_id.encode(), tp_rank=0,
                      tp_size=1, device="cpu", capacity=capacity, kv_endpoint=None,
                      last_seen=0.0, state=WorkerState.READY, num_active=active)


def test_request_lifecycle_and_fifo_queue() -> None:
    table = RequestTable()
    for i in range(5):
        table.admit(_request(f"r{i}"))
    assert [r.req_id for r in table.peek_queued(3)] == ["r0", "r1", "r2"]
    first = table.get("r0")
    assert first is not None and first.times.t_queued is not None
    table.dequeue(first)
    first.start_encode("enc0", "dec0")
    assert table.num_queued == 4 and first.state is State.ENCODING
    assert first.add_tokens((7,), now=1.0) == 0 and first.add_tokens((8, 9), now=2.0) == 1
    assert first.complete and first.times.t_first_token == 1.0
    assert first.times.t_tokens == [1.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="already in flight"):
        table.admit(_request("r1"))
    with pytest.raises(ValueError, match="expected queued"):
        first.start_encode("enc0", "dec0")


def test_a_lost_encoder_only_takes_requests_not_yet_past_it() -> None:
    table = RequestTable()
    a, b = _request("a"), _request("b")
    for r in (a, b):
        table.admit(r)
        table.dequeue(r)
        r.start_encode("enc0", "dec0")
    b.add_tokens((1,), now=0.0)  # b's KV reached its decoder
    assert [r.req_id for r in table.held_by("enc0")] == ["a"]
    assert {r.req_id for r in table.held_by("dec0")} == {"a", "b"}


def test_placement_respects_decoder_capacity_and_balances() -> None:
    queued = [_request(f"r{i}") for i in range(10)]
    decoders = [_worker("d0", "decoder", capacity=3, active=1),
                _worker("d1", "decoder", capacity=3)]
    placed = place_batch(queued, decoders, max_batch=8)
    assert [r.req_id for r, _ in placed] == [f"r{i}" for i in range(5)]  # 2 + 3 free slots
    assert sum(d.worker_id == "d0" for _, d in placed) == 2
    assert place_batch(queued, decoders, max_batch=2)[0][1].worker_id == "d1"
    assert place_batch(queued, [_worker("d", "decoder", capacity=1, active=1)], 8) == []


def test_pick_encoder_bounds_batches_in_flight() -> None:
    busy, idle = _worker("e0", "encoder"), _worker("e1", "encoder")
    busy.outstanding_batches = 2
    assert pick_encoder([busy, idle], max_outstanding=2) is idle
    idle.outstanding_batches = 2
    assert pick_encoder([busy, idle], max_outstanding=2) is None


def test_registry_groups_tp_ranks() -> None:
    reg = Registry()
    for rank in range(2):
        info = _worker(f"dec0.r{rank}", "decoder")
        info.tp_rank = rank
        reg.add(info)
    reg.add(_worker("dec1", "decoder"))
    assert group_stem("dec0.r1") == "dec0" and group_stem("enc-host.rx") == "enc-host.rx"
    first = reg.get("dec0.r0")
    assert first is not None
    assert {w.worker_id for w in reg.group_of(first)} == {"dec0.r0", "dec0.r1"}
    assert [w.worker_id for w in reg.ready("decoder")] == ["dec0.r0", "dec1"]  # rank 0 leads


def test_admission_limits_are_clear_errors() -> None:
    cfg = CoordinatorConfig(client_endpoint="tcp://127.0.0.1:1", worker_endpoint="tcp://1.2.3.4:2",
                            max_queued=1, max_prompt_tokens=4, max_new_tokens=8)
    table = RequestTable()

    def submit(req_id: str, **kw: object) -> P.Submit:
        kw.setdefault("max_new_tokens", 4)
        return P.Submit(req_id=req_id, prompt_ids=kw.pop("ids", (1, 2)), **kw)  # type: ignore[arg-type]

    with pytest.raises(BadRequest, match="over the limit of 4"):
        admit(submit("a", ids=(1,) * 5), b"c", cfg, table, False, 100)
    with pytest.raises(BadRequest, match="max_new_tokens 9"):
        admit(submit("a", max_new_tokens=9), b"c", cfg, table, False, 100)
    with pytest.raises(BadRequest, match="outside the vocabulary"):
        admit(submit("a", ids=(100,)), b"c", cfg, table, False, 100)
    with pytest.raises(BadRequest, match="prompt_ids"):
        admit(P.Submit(req_id="t", prompt="text", max_new_tokens=4), b"c", cfg, table, False, 100)
    admit(submit("a"), b"c", cfg, table, False, 100)
    with pytest.raises(Overloaded) as over:
        admit(submit("b"), b"c", cfg, table, False, 100)
    assert over.value.retry_after_s is not None
    with pytest.raises(ShuttingDown):
        admit(submit("c"), b"c", cfg, table, True, 100)


def test_coordinator_timestamps_track_the_wire_lifecycle_fields() -> None:
    """The coordinator's mutable accumulator and the frozen wire value must name the same
    stamps, or a stamp added to one is silently dropped on the way to the client."""
    from dataclasses import fields

    from common.protocol import Lifecycle
    from coordinator.requests import Timestamps

    assert [f.name for f in fields(Timestamps)] == [f.name for f in fields(Lifecycle)]
    # Workers' stamps merge in; per-token times are the coordinator's own (taken as it relays).
    stamps = Timestamps(t_arrival=1.0, t_queued=2.0, t_first_token=3.0, t_tokens=[3.0, 4.0])
    back = Timestamps(t_tokens=[5.0])
    back.take(stamps.lifecycle())
    assert back.lifecycle() == Lifecycle(t_arrival=1.0, t_queued=2.0, t_first_token=3.0,
                                         t_tokens=(5.0,))
