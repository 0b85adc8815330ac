"""The coordinator's pipeline side in process (no sockets): stage handshake, Assign and the peers
refresh, passes out, PassDone in (tokens, errors), a lost stage."""

from __future__ import annotations

from typing import Any

import pytest

from common import protocol as P
from common.models.config import stage_layer_ranges
from coordinator.config import CoordinatorConfig
from coordinator.membership import Membership
from coordinator.pipeline_driver import stage_layout
from coordinator.relay import Relay
from coordinator.server import Coordinator


class Sock:
    """Records what would go out of a ROUTER socket: (route, message)."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, P.Message]] = []

    def send_multipart(self, frames: list[Any], flags: int = 0, copy: bool = True) -> None:
        self.sent.append((bytes(frames[0]), P.decode([bytes(f) for f in frames[1:]])))

    def take(self, kind: type) -> list[tuple[bytes, Any]]:
        out = [(r, m) for r, m in self.sent if isinstance(m, kind)]
        self.sent = [(r, m) for r, m in self.sent if not isinstance(m, kind)]
        return out


class Log:
    def __getattr__(self, name: str) -> Any:
        return lambda *a, **kw: None


def _coordinator(**kw: Any) -> tuple[Coordinator, Sock, Sock]:
    kw = {"policy": "static", "max_encode_batch": 4, **kw}
    cfg = CoordinatorConfig("ipc:///tmp/c", "ipc:///tmp/w", pipeline_stages=2, **kw)
    co = Coordinator(cfg, Log())
    workers, clients = Sock(), Sock()
    co.client_endpoint = co.worker_endpoint = "ipc:///tmp/x"
    co.relay = Relay(clients, co.log, co.counters)  # type: ignore[arg-type]
    co.members = Membership(co, workers)  # type: ignore[arg-type]
    return co, workers, clients


def _hello(co: Coordinator, stage: Any, role: str = "pipeline") -> None:
    co.members.on_hello(f"s{stage}".encode(), P.Hello(worker_id=f"stage{stage}", role=role,
                                                      capacity={"stage": stage}))


def _serving(**kw: Any) -> tuple[Coordinator, Sock, Sock]:
    co, workers, clients = _coordinator(**kw)
    for s in (0, 1):
        _hello(co, s)
    for s in (0, 1):
        co.members._dispatch(co.members.registry.get(f"stage{s}"),
                             P.Ready(worker_id=f"stage{s}", kv_endpoint=f"ipc:///tmp/kv{s}"))
    return co, workers, clients


def test_stages_are_assigned_their_layers_then_told_the_next_stage() -> None:
    co, workers, _ = _coordinator()
    _hello(co, 0)
    _hello(co, 1)
    _hello(co, 2)  # no such stage
    _hello(co, 0, role="encoder")  # a pipeline plan assigns no encoders
    assigns = workers.take(P.Assign)
    assert [(a.group, a.layer_range, a.config["pipeline"]) for _, a in assigns] == [
        (0, (0, 1), {"stage": 0, "num_stages": 2}), (1, (1, 2), {"stage": 1, "num_stages": 2})]
    errors = [m.message for _, m in workers.take(P.Error)]
    assert "stage in 0..1" in errors[0] and "pipeline roles, not 'encoder'" in errors[1]
    co.members._dispatch(co.members.registry.get("stage1"),
                         P.Ready(worker_id="stage1", kv_endpoint="ipc:///tmp/kv1"))
    assert not co.members.serving and not workers.take(P.Assign)
    co.members._dispatch(co.members.registry.get("stage0"), P.Ready(worker_id="stage0"))
    refresh = workers.take(P.Assign)
    assert [(r, a.peers) for r, a in refresh] == [(b"s0", {"next": "ipc:///tmp/kv1"})]
    assert co.members.serving and co.members.can_serve()


def _submit(co: Coordinator, req_id: str, n: int = 3) -> None:
    co.on_submit(b"client", P.Submit(req_id=req_id, prompt=None, prompt_ids=(5, 6),
                                     max_new_tokens=n))


def test_a_failed_pass_fails_its_requests_and_frees_them_next_pass() -> None:
    co, workers, clients = _serving()
    workers.sent.clear()
    _submit(co, "a")
    _submit(co, "b")
    co.schedule()
    [(route, sp)] = workers.take(P.StagePass)
    assert route == b"s0" and sp.kind == "encode" and sp.req_ids == ("a", "b")
    stage1 = co.members.registry.get("stage1")
    co.members._dispatch(stage1, P.PassDone(worker_id="stage1", pass_id=sp.pass_id,
                                            stream=sp.stream, kind="encode", error="boom"))
    errors = [m for _, m in clients.take(P.Error)]
    assert [(e.req_id, e.code) for e in errors] == [("a", "bad_request"), ("b", "bad_request")]
    assert "stage1 failed the encode pass" in errors[0].message and "boom" in errors[0].message
    co.schedule()  # the stream is idle again: it frees what the stages before stage1 hold
    [(_, sweep)] = workers.take(P.StagePass)
    assert (sweep.kind, sweep.req_ids, set(sweep.free)) == ("decode", (), {"a", "b"})
    assert co.counters["failed"] == 2 and not len(co.table)


def test_tokens_are_relayed_and_finished_requests_freed() -> None:
    co, workers, clients = _serving()
    workers.sent.clear()
    _submit(co, "a", n=2)
    co.schedule()
    [(_, sp)] = workers.take(P.StagePass)
    stage1 = co.members.registry.get("stage1")
    co.members._dispatch(stage1, P.PassDone(worker_id="stage1", pass_id=sp.pass_id,
                                            stream=sp.stream, kind="encode",
                                            updates=(P.TokenUpdate("a", (7,)),)))
    co.schedule()
    [(_, dec)] = workers.take(P.StagePass)
    assert (dec.kind, dec.req_ids, dec.tokens) == ("decode", ("a",), (7,))
    co.members._dispatch(stage1, P.PassDone(
        worker_id="stage1", pass_id=dec.pass_id, stream=dec.stream, kind="decode",
        updates=(P.TokenUpdate("a", (9,), finished=True, finish_reason="length"),)))
    [(_, result)] = clients.take(P.Result)
    assert list(result.tokens) == [7, 9] and result.finish_reason == "length"
    life = result.lifecycle
    assert life.t_encode_start <= life.t_encode_end <= life.t_first_token <= life.t_finish
    co.schedule()
    [(_, sweep)] = workers.take(P.StagePass)
    assert sweep.free == ("a",) and sweep.req_ids == ()


def test_a_lost_stage_fails_what_the_pipeline_held() -> None:
    co, workers, clients = _serving()
    _submit(co, "a")
    co.schedule()
    _submit(co, "q")  # still queued: the tick answers it as unavailable
    co.members.lose(co.members.registry.get("stage1"), "test")
    [(_, err)] = clients.take(P.Error)
    assert (err.req_id, err.code) == ("a", "worker_lost") and "stage1" in err.message
    assert co.members.missing_roles() == ["pipeline"]
    co.fail_queued_unavailable()
    assert [(e.req_id, e.code) for _, e in clients.take(P.Error)] == [("q", "unavailable")]


def test_layouts_cover_the_model() -> None:
    from common.models.config import ModelConfig

    assert stage_layer_ranges(30, 4) == [(0, 8), (8, 16), (16, 23), (23, 30)]
    llama = ModelConfig.preset("tiny-llama")
    cfg = CoordinatorConfig("ipc:///a", "ipc:///b", policy="rra", pipeline_stages=2,
                            stage_layers="0:1,2:2")
    with pytest.raises(ValueError, match="contiguous"):
        stage_layout(cfg, llama)
    t5 = ModelConfig.preset("tiny-t5")
    cfg = CoordinatorConfig("ipc:///a", "ipc:///b", policy="rra", pipeline_stages=1)
    assert stage_layout(cfg, t5).encoder_layers == ((0, t5.num_encoder_layers),)
    with pytest.raises(ValueError, match="pipeline_stages"):
        CoordinatorConfig("ipc:///a", "ipc:///b", policy="rra", pipeline_stages=2,
                          stage_layers="0:2")


def test_rra_streams_start_their_cycles_in_lock_step() -> None:
    """A stream whose cycle ended does not encode while the other is inside the same cycle
    (its encode would sit in front of the other's decode passes on every stage)."""
    co, workers, _ = _serving(policy="rra", max_encode_batch=1, n_d=2)
    workers.sent.clear()
    for r in "abcd":
        _submit(co, r, n=10)
    co.schedule()
    first = [sp for _, sp in workers.take(P.StagePass)]
    assert [(sp.stream, sp.kind, sp.req_ids) for sp in first] == [
        (0, "encode", ("a",)), (1, "encode", ("b",))]
    stage1 = co.members.registry.get("stage1")

    def done(sp: P.StagePass, req: str, token: int) -> P.StagePass | None:
        co.members._dispatch(stage1, P.PassDone(worker_id="stage1", pass_id=sp.pass_id,
                                                stream=sp.stream, kind=sp.kind,
                                                updates=(P.TokenUpdate(req, (token,)),)))
        co.schedule()
        sent = [m for _, m in workers.take(P.StagePass)]
        return sent[0] if sent else None

    sp = first[0]
    for token in (7, 8):  # stream 0: encode back, then its two decode passes
        sp = done(sp, "a", token)
        assert sp is not None and (sp.stream, sp.kind) == (0, "decode")
    assert done(sp, "a", 9) is None  # cycle over, "c" waits: stream 1 is mid-cycle
    sp = first[1]
    for token in (7, 8):
        sp = done(sp, "b", token)
        assert sp is not None and (sp.stream, sp.kind) == (1, "decode")
    co.members._dispatch(stage1, P.PassDone(worker_id="stage1", pass_id=sp.pass_id,
                                            stream=1, kind="decode",
                                            updates=(P.TokenUpdate("b", (9,)),)))
    co.schedule()  # both cycles over: both streams encode their next requests
    assert sorted((m.stream, m.kind, m.req_ids) for _, m in workers.take(P.StagePass)) == [
        (0, "encode", ("c",)), (1, "encode", ("d",))]
