"""A staged WAA mesh's live tp_size change in process (no sockets, fake workers): the encoder
and decoder pipelines of two tp-1 stages each become one tp-2 stage each (two-step Assign per
group: rank 0's rendezvous, then rank 1 with it), a running request migrated as a new run,
and back; the adapter's target for TP staged plans and what it still refuses."""

from __future__ import annotations

import dataclasses
from typing import Any

from common import protocol as P
from coordinator.adapt_relayout import relayout_target
from coordinator.planner.plan import WorkerGroup
from coordinator.relayout import RelayoutConfig
from coordinator.relayout_tp import WaaTpRelayout
from coordinator.server import Coordinator
from coordinator.waa_layout import WaaLayout
from tests.runner.test_adapt_waa_relayout_unit import _plan, _ready
from tests.runner.test_adapt_waa_relayout_unit import _serving as _adapting
from tests.runner.test_pipeline_driver import Sock
from tests.runner.test_waa_pipeline_driver import _done, _submit

NAMES = ("enc0", "enc1", "dec0", "dec1")
HALVES = ((0, 15), (15, 30))
TP2 = WaaLayout(((0, 30),), ((0, 30),), tp=(2, 2))
TP1 = WaaLayout(HALVES, HALVES, tp=(1, 1, 1, 1))


def _serving() -> tuple[Coordinator, Sock, Sock]:
    """smollm2-135m shapes: encoder stages [0, 15), [15, 30) and decoder stages the same,
    four tp-1 workers, B_m 1, every stage READY."""
    return _adapting("0:15,15:30", "0:15,15:30", NAMES)


def _start(co: Coordinator, layout: WaaLayout, epoch: int) -> list[dict[str, Any]]:
    done: list[dict[str, Any]] = []
    co.pipeline.switch = WaaTpRelayout(co.pipeline, layout, 1, epoch, done.append,
                                       RelayoutConfig(drain_timeout_s=0.0))
    co.schedule()
    return done


def _place(a: P.Assign) -> tuple[Any, ...]:
    waa = a.config["pipeline"]["waa"]
    return (waa["side"], a.layer_range, a.tp_rank, a.tp_size, a.config["tp"],
            a.config["relayout"])


def test_both_pipelines_become_tp2_stages_with_a_running_request_migrated() -> None:
    co, workers, clients = _serving()
    for r in "ab":
        _submit(co, r)
    co.schedule()
    [(_, enc)] = workers.take(P.StagePass)
    _done(co, "enc1", enc)  # first tokens: a and b join the micro-batch
    co.schedule()
    [(_, dec)] = workers.take(P.StagePass)
    done = _start(co, TP2, 1)
    assert done == [] and not workers.take(P.Assign)  # the decode pass in flight comes back
    _submit(co, "c")  # queued meanwhile, not refused
    _done(co, "dec1", dec, finished=("a",))
    co.schedule()  # b migrates (a new run), then step 1: each group's rank 0 alone
    step1 = {route.decode(): _place(a) for route, a in workers.take(P.Assign)}
    assert step1 == {
        "enc0": ("encoder", (0, 30), 0, 2, {"group": "e1.s0", "init": None}, 1),
        "dec0": ("decoder", (0, 30), 0, 2, {"group": "e1.s1", "init": None}, 1)}
    assert co.table.get("b").wire_id == "b~rerun1" and co.members.can_serve()
    _ready(co, "dec0", {"relayout": 1, "tp_rendezvous": "tcp://127.0.0.1:7001"})
    co.schedule()
    [(route, follower)] = workers.take(P.Assign)  # step 2 for the decoder group only
    assert route == b"dec1" and _place(follower) == (
        "decoder", (0, 30), 1, 2, {"group": "e1.s1", "init": "tcp://127.0.0.1:7001"}, 1)
    _ready(co, "enc0", {"relayout": 1, "tp_rendezvous": "tcp://127.0.0.1:7000"})
    co.schedule()
    [(route, follower)] = workers.take(P.Assign)
    assert route == b"enc1" and follower.config["tp"]["init"] == "tcp://127.0.0.1:7000"
    for name in NAMES:
        assert not done
        _ready(co, name, {"relayout": 1, "reload_s": 0.5 if name == "dec1" else 0.1})
        co.schedule()
    [cost] = done
    assert cost["ok"] and cost["tp_sizes"] == {"encoder": [2], "decoder": [2]}
    assert cost["migrated_requests"] == 1 and cost["reload_s"] == 0.5
    assert set(cost["rendezvous_s"]) == {"enc0", "dec0"}
    assert cost["stages"] == {"encoder": [[0, 30]], "decoder": [[0, 30]]}
    registry = co.members.registry
    assert [(w.worker_id, w.stage, w.tp_rank, w.tp_size) for w in registry] == [
        ("enc0", 0, 0, 2), ("enc1", 0, 1, 2), ("dec0", 1, 0, 2), ("dec1", 1, 1, 2)]
    assert [w.worker_id for w in registry.group_of(registry.get("dec1"))] == ["dec0", "dec1"]
    refreshed = {route.decode(): a for route, a in workers.take(P.Assign)}
    assert set(refreshed) == {"enc0", "dec0"}  # the leads learn their peers
    assert refreshed["enc0"].peers == {"kv0": "ipc:///tmp/kv-dec0"}
    passes = {(route.decode(), sp.kind): sp for route, sp in workers.take(P.StagePass)}
    encode = passes[("enc0", "encode")]  # the leads alone carry the data
    assert encode.req_ids == ("b~rerun1", "c")
    assert set(passes[("dec0", "decode")].free) == {"a", "b"}  # the old runs' ids
    _done(co, "enc0", encode)
    assert co.table.get("b").tokens == [9, 9, 9]
    assert [m.req_id for _, m in clients.take(P.Result)] == ["a"]


def test_back_to_four_tp1_stages_no_rendezvous() -> None:
    co, workers, _ = _serving()
    _start(co, TP2, 1)
    for lead, follower in (("enc0", "enc1"), ("dec0", "dec1")):
        _ready(co, lead, {"relayout": 1, "tp_rendezvous": "tcp://h:1"})
        co.schedule()
        _ready(co, follower, {"relayout": 1, "reload_s": 0.1})
        _ready(co, lead, {"relayout": 1, "reload_s": 0.1})
        co.schedule()
    assert co.pipeline.switch is None and co.pipeline.layout == TP2
    workers.sent.clear()
    done = _start(co, TP1, 2)  # idle: every worker re-assigned at once, all tp-1
    assigns = {route.decode(): _place(a) for route, a in workers.take(P.Assign)}
    none = {"group": None, "init": None}
    assert assigns == {"enc0": ("encoder", (0, 15), 0, 1, none, 2),
                       "enc1": ("encoder", (15, 30), 0, 1, none, 2),
                       "dec0": ("decoder", (0, 15), 0, 1, none, 2),
                       "dec1": ("decoder", (15, 30), 0, 1, none, 2)}
    for name in NAMES:
        _ready(co, name, {"relayout": 2, "reload_s": 0.1})
    co.schedule()
    [cost] = done
    assert cost["ok"] and cost["tp_sizes"] == {"encoder": [1, 1], "decoder": [1, 1]}
    assert [w.tp_group for w in co.members.registry] == list(NAMES)


def test_a_rank_lost_while_its_group_forms_fails_the_switch() -> None:
    co, _, _ = _serving()
    done = _start(co, TP2, 1)
    co.members.lose(co.members.registry.get("enc1"), "test")
    [cost] = done
    assert not cost["ok"] and "enc1 was lost" in cost["error"]


def test_which_tp_staged_plans_the_adapter_takes_live() -> None:
    co, _, _ = _serving()
    served = _plan((("encoder", HALVES[0]), ("encoder", HALVES[1]), ("decoder", HALVES[0]),
                    ("decoder", HALVES[1])))
    tp2 = _plan((("encoder", (0, 30)), ("decoder", (0, 30))), count=2, tp=2)
    assert relayout_target(co, served, tp2) == (TP2, 2)
    plain = relayout_target(co, served, served)  # all tp-1 from tp-1: the plain re-layout
    assert plain == (WaaLayout(HALVES, HALVES), 2)
    mixed = _plan((("encoder", (0, 30)), ("decoder", HALVES[0]), ("decoder", HALVES[1])))
    mixed = dataclasses.replace(mixed, num_workers=4, worker_groups=(
        WorkerGroup("encoder", 2, 2, (0, 30)), *mixed.worker_groups[1:]))
    assert relayout_target(co, served, mixed) == (
        WaaLayout(((0, 30),), HALVES, tp=(2, 1, 1)), 2)
    too_many = _plan((("encoder", (0, 30)), ("decoder", HALVES[0]), ("decoder", HALVES[1])),
                     count=2, tp=2)
    assert "3 stages of 6 ranks (tp [2, 2, 2]), 4 stage workers" in relayout_target(
        co, served, too_many)
    replicas = _plan((("encoder", (0, 30)), ("decoder", (0, 30))), count=2, tp=1)
    assert "count != tp_size" in relayout_target(co, served, replicas)
    co.members.registry.get("dec1").kv_endpoint = None
    assert "without a KV endpoint" in relayout_target(co, served, tp2)
