"""The coordinator's staged-WAA side in process (no sockets): Assigns with KV routes, encode
passes sized by B_E, first tokens joining B_m micro-batches, decode passes in flight per
micro-batch, frees, and which requests a lost encoder or decoder stage takes down."""

from __future__ import annotations

from typing import Any

from common import protocol as P
from common.errors import WorkerLost
from coordinator.config import CoordinatorConfig
from coordinator.membership import Membership
from coordinator.server import Coordinator
from coordinator.waa_layout import WaaLayout
from tests.runner.test_pipeline_driver import Log, Relay, Sock

NAMES = ("enc0", "enc1", "dec0", "dec1")


def _serving(**kw: Any) -> tuple[Coordinator, Sock, Sock]:
    """tiny-llama (2 layers): encoder stages [0, 1), [1, 2), decoder stages [0, 1), [1, 2),
    B_E = 2, B_m = 2, every stage READY."""
    cfg = CoordinatorConfig("ipc:///tmp/c", "ipc:///tmp/w", max_encode_batch=2, streams=2,
                            waa_encoder_layers="0:1,1:2", waa_decoder_layers="0:1,1:2", **kw)
    co = Coordinator(cfg, Log())
    workers, clients = Sock(), Sock()
    co.client_endpoint = co.worker_endpoint = "ipc:///tmp/x"
    co.relay = Relay(clients, co.log, co.counters)  # type: ignore[arg-type]
    co.members = Membership(co, workers)  # type: ignore[arg-type]
    for s, name in enumerate(NAMES):
        co.members.on_hello(name.encode(), P.Hello(worker_id=name, role="pipeline",
                                                   capacity={"stage": s, "max_seqs": 8}))
    for s, name in enumerate(NAMES):
        co.members._dispatch(co.members.registry.get(name),
                             P.Ready(worker_id=name, kv_endpoint=f"ipc:///tmp/kv{s}"))
    return co, workers, clients


def _submit(co: Coordinator, req_id: str, n: int = 5) -> None:
    co.on_submit(b"client", P.Submit(req_id=req_id, prompt=None, prompt_ids=(5, 6, 7),
                                     max_new_tokens=n))


def _done(co: Coordinator, worker: str, sp: P.StagePass, finished: tuple[str, ...] = ()
          ) -> None:
    updates = tuple(P.TokenUpdate(req_id=r, tokens=(9,), finished=r in finished,
                                  finish_reason="stop" if r in finished else None)
                    for r in sp.req_ids)
    co.members._dispatch(co.members.registry.get(worker), P.PassDone(
        worker_id=worker, pass_id=sp.pass_id, stream=sp.stream, kind=sp.kind, updates=updates))


def test_layout_routes_each_encoder_stage_to_the_decoder_stages_it_overlaps() -> None:
    layout = WaaLayout(encoder=((0, 7), (7, 14), (14, 40)), decoder=((0, 20), (20, 40)))
    assert layout.routes(0) == [(0, (0, 7))]
    assert layout.routes(2) == [(0, (14, 20)), (1, (20, 40))]
    assert layout.side(3) == ("decoder", 0)


def test_assigns_name_routes_and_peers_once_every_stage_is_ready() -> None:
    co, workers, _ = _serving()
    assert co.members.serving
    last = {}
    for route, a in workers.take(P.Assign):
        last[route] = a
    waa = {r.decode(): a.config["pipeline"]["waa"] for r, a in last.items()}
    assert waa["enc0"] == {"side": "encoder", "index": 0, "count": 2, "routes": [["kv0", [0, 1]]]}
    assert waa["enc1"]["routes"] == [["kv1", [1, 2]]]
    assert last[b"enc0"].peers == {"next": "ipc:///tmp/kv1", "kv0": "ipc:///tmp/kv2"}
    assert last[b"dec0"].peers == {"next": "ipc:///tmp/kv3"} and last[b"dec1"].peers == {}
    assert last[b"dec1"].layer_range == (1, 2)


def test_requests_flow_through_both_pipelines_and_micro_batches() -> None:
    co, workers, clients = _serving()
    workers.sent.clear()
    for r in "abcd":
        _submit(co, r)
    co.schedule()
    encodes = [(route, sp) for route, sp in workers.take(P.StagePass)]
    assert [(route, sp.kind, sp.req_ids) for route, sp in encodes] == [
        (b"enc0", "encode", ("a", "b")), (b"enc0", "encode", ("c", "d"))]  # E = 2 in flight
    _done(co, "enc1", encodes[0][1], finished=("b",))  # b ends at its first token
    co.schedule()
    [(route, first)] = workers.take(P.StagePass)
    assert route == b"dec0" and first.kind == "decode" and first.req_ids == ("a",)
    _done(co, "enc1", encodes[1][1])
    co.schedule()
    [(_, second)] = workers.take(P.StagePass)  # c, d join the emptiest micro-batch each
    assert second.stream != first.stream and second.req_ids == ("c",)
    assert set(first.free + second.free) == {"b"}  # the decoder stages drop b's KV
    _done(co, "dec1", first, finished=("a",))  # a micro-batch's next pass waits for this
    co.schedule()
    [(_, merged)] = workers.take(P.StagePass)
    assert (merged.stream, merged.req_ids, merged.free) == (first.stream, ("d",), ("a",))
    results = [m for _, m in clients.take(P.Result)]
    assert sorted(m.req_id for m in results) == ["a", "b"]


def test_a_lost_encoder_stage_spares_decoding_requests() -> None:
    co, workers, clients = _serving()
    for r in "ab":
        _submit(co, r)
    co.schedule()
    [(_, enc)] = workers.take(P.StagePass)
    _done(co, "enc1", enc)
    _submit(co, "c")
    co.schedule()
    passes = [sp for _, sp in workers.take(P.StagePass)]
    assert {sp.kind for sp in passes} == {"encode", "decode"}
    co.members.lose(co.members.registry.get("enc1"), "test")
    errors = [m for _, m in clients.take(P.Error)]
    assert [m.req_id for m in errors] == ["c"] and errors[0].code == WorkerLost.code
    assert "encoder stage" in errors[0].message
    assert {"a", "b"} <= {r.req_id for r in co.table}  # still decoding
    co.members.lose(co.members.registry.get("dec0"), "test")
    lost = sorted(m.req_id for _, m in clients.take(P.Error))
    assert lost == ["a", "b"] and not len(co.table)
    assert not co.members.can_serve()  # until dec0 is back: submits are refused
