"""The tp_size re-layout's state machine in process (no sockets, fake workers): two tp-1
stages become one tp-2 stage (two-step Assign: rank 0's rendezvous, then rank 1) and back;
the coordinator-assigned group is what a loss takes down; the adapter's target and switch;
which groups a switch keeps (no re-group, no rebuild) and which it rebuilds."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from common import protocol as P
from coordinator.adapt_relayout import relayout_target
from coordinator.pipeline_driver import StageLayout
from coordinator.planner.plan import WorkerGroup
from coordinator.relayout import RelayoutConfig
from coordinator.relayout_tp import TpRelayout, TpStageLayout, check_heads, kept_stages
from coordinator.streams import StreamKnobs
from tests.runner.test_adapt_relayout_unit import _first_token, _plan, _ready
from tests.runner.test_pipeline_driver import _serving, _submit

ONE_TP2 = TpStageLayout(((0, 2),), tp=(2,))
TWO_TP1 = TpStageLayout(((0, 1), (1, 2)), tp=(1, 1))


def _switch(co: Any, layout: TpStageLayout, epoch: int, done: list[dict[str, Any]]) -> None:
    driver = co.pipeline
    driver.switch = TpRelayout(driver, layout, layout.num_stages, StreamKnobs("static", 4),
                               epoch, done.append, RelayoutConfig(drain_timeout_s=0.0))
    co.schedule()


def _to_tp2(co: Any, workers: Any, done: list[dict[str, Any]]) -> None:
    workers.take(P.Assign)  # the startup's
    _switch(co, ONE_TP2, 1, done)
    [(route, lead)] = workers.take(P.Assign)  # step 1: rank 0 only
    assert route == b"s0" and (lead.tp_rank, lead.tp_size, lead.layer_range) == (0, 2, (0, 2))
    assert lead.config["tp"] == {"group": "e1.s0", "init": None}
    assert lead.config["relayout"] == 1
    _ready(co, "stage0", {"relayout": 1, "tp_rendezvous": "tcp://127.0.0.1:4242"})
    co.schedule()
    assert not done and co.members.registry.get("stage0").state.value == "assigned"
    [(route, follower)] = workers.take(P.Assign)  # step 2: rank 1 with the address
    assert route == b"s1" and (follower.tp_rank, follower.tp_size) == (1, 2)
    assert follower.config["tp"] == {"group": "e1.s0", "init": "tcp://127.0.0.1:4242"}
    assert follower.config["pipeline"] == {"stage": 0, "num_stages": 1}
    _ready(co, "stage1", {"relayout": 1, "reload_s": 0.5})
    co.schedule()
    assert not done  # rank 0 has not built its shard yet
    _ready(co, "stage0", {"relayout": 1, "reload_s": 0.25})
    co.schedule()


def test_two_tp1_stages_become_one_tp2_stage_and_back() -> None:
    co, workers, _ = _serving()
    workers.sent.clear()
    _first_token(co, workers)  # "a" runs on the old layout: it is migrated
    done: list[dict[str, Any]] = []
    _to_tp2(co, workers, done)
    [cost] = done
    assert cost["ok"] and cost["tp_sizes"] == [2] and cost["migrated_requests"] == 1
    assert cost["reload_s"] == 0.5 and set(cost["rendezvous_s"]) == {"stage0"}
    [(route, sp)] = workers.take(P.StagePass)  # rank 0 alone carries the data
    assert route == b"s0" and sp.req_ids == ("a",)
    registry = co.members.registry
    assert [(w.worker_id, w.stage, w.tp_rank, w.tp_size) for w in registry] == [
        ("stage0", 0, 0, 2), ("stage1", 0, 1, 2)]
    assert len(registry.group_of(registry.get("stage1"))) == 2
    co.members._dispatch(registry.get("stage0"), P.PassDone(
        worker_id="stage0", pass_id=sp.pass_id, stream=sp.stream, kind="encode",
        updates=(P.TokenUpdate("a", (8,), finished=True, finish_reason="length"),)))
    workers.sent.clear()
    back: list[dict[str, Any]] = []
    _switch(co, TWO_TP1, 2, back)  # both tp-1 again: no rendezvous, both at once
    assigns = dict(workers.take(P.Assign))
    assert {r: (a.tp_rank, a.tp_size, a.layer_range, a.config["tp"])
            for r, a in assigns.items()} == {
        b"s0": (0, 1, (0, 1), {"group": None, "init": None}),
        b"s1": (0, 1, (1, 2), {"group": None, "init": None})}
    for worker in ("stage0", "stage1"):
        _ready(co, worker, {"relayout": 2, "reload_s": 0.1})
    co.schedule()
    [cost] = back
    assert cost["ok"] and cost["tp_sizes"] == [1, 1]
    assert len(registry.group_of(registry.get("stage1"))) == 1  # its own group now
    _submit(co, "b")
    co.schedule()
    [(route, sp)] = workers.take(P.StagePass)
    assert route == b"s0" and sp.req_ids == ("b",)


def test_losing_a_rank_of_a_live_group_takes_the_group_down() -> None:
    co, workers, _ = _serving()
    done: list[dict[str, Any]] = []
    _to_tp2(co, workers, done)
    assert done[0]["ok"]
    co.members.lose(co.members.registry.get("stage1"), "test")
    assert len(co.members.registry) == 0 and not co.members.can_serve()


def test_a_rank_lost_before_its_group_forms_fails_the_switch() -> None:
    co, workers, _ = _serving()
    done: list[dict[str, Any]] = []
    _switch(co, ONE_TP2, 3, done)
    co.members.lose(co.members.registry.get("stage0"), "test")
    [cost] = done
    assert not cost["ok"] and "stage0 was lost" in cost["error"]
    assert co.pipeline.switch is None


def test_the_adapter_targets_a_tp_change_and_refuses_what_cannot_fit() -> None:
    co, _, _ = _serving()
    served = _plan((WorkerGroup("pipeline", 1, 1, (0, 1)), WorkerGroup("pipeline", 1, 1, (1, 2))))
    tp = _plan((WorkerGroup("pipeline", 2, 2, (0, 2)),))
    layout, streams = relayout_target(co, served, tp)  # type: ignore[misc]
    assert isinstance(layout, TpStageLayout) and layout.tp == (2,) and streams == 1
    back, _ = relayout_target(co, tp, served)  # type: ignore[misc]
    assert isinstance(back, TpStageLayout) and back.tp == (1, 1)
    four = _plan((WorkerGroup("pipeline", 4, 4, (0, 2)),))
    assert "needs 4 stage workers" in relayout_target(co, served, four)
    replicas = _plan((WorkerGroup("pipeline", 4, 2, (0, 2)),))
    assert "count != tp_size" in relayout_target(co, served, replicas)


def test_the_adapter_logs_plan_switch_with_the_cost_of_a_tp_change() -> None:
    from coordinator.adapt_relayout import start

    co, workers, _ = _serving()
    served = _plan((WorkerGroup("pipeline", 1, 1, (0, 1)), WorkerGroup("pipeline", 1, 1, (1, 2))))
    tp = _plan((WorkerGroup("pipeline", 2, 2, (0, 2)),))
    logged: list[tuple[str, dict[str, Any]]] = []

    class Adapter:
        relayouts, relayouting, plan, switches = 0, None, served, []

        class cfg:  # noqa: N801 - the adapter's config, as adapt_relayout reads it
            class drift:  # noqa: N801
                drain_timeout_s = 0.0

    adapter = Adapter()
    adapter.co = co  # type: ignore[attr-defined]
    co.log = type("L", (), {"info": lambda self, ev, **kw: logged.append((ev, kw)),
                            "error": lambda self, ev, **kw: logged.append((ev, kw))})()
    target = relayout_target(co, served, tp)
    assert not isinstance(target, str)
    start(adapter, tp, target, {"reason": "test", "t_fire": 0.0})
    _ready(co, "stage0", {"relayout": 1, "tp_rendezvous": "tcp://127.0.0.1:1"})
    _ready(co, "stage1", {"relayout": 1, "reload_s": 0.3})
    _ready(co, "stage0", {"relayout": 1, "reload_s": 0.2})
    co.schedule()
    [(_, switch)] = [(e, kw) for e, kw in logged if e == "plan_switch"]
    assert adapter.plan is tp and switch["relayout"]["tp_sizes"] == [2]
    assert switch["relayout"]["reload_s"] == 0.3 and switch["pause_s"] >= 0
    assert [g["tp_size"] for g in switch["new_layout"]] == [2]


def _w(worker_id: str, stage: int | None, rank: int = 0, size: int = 1) -> Any:
    return SimpleNamespace(worker_id=worker_id, stage=stage, tp_rank=rank, tp_size=size)


THREE = StageLayout(((0, 1), (1, 2), (2, 3)))
W3 = [_w("a", 0), _w("b", 1), _w("c", 2)]


def test_a_group_that_stays_is_kept_and_the_merged_ones_rebuilt() -> None:
    # the first two merge: c keeps its ranks, tp size and layers; its index moves 2 -> 1
    assert kept_stages(W3, THREE, TpStageLayout(((0, 2), (2, 3)), tp=(2, 1))) == {1: 2}
    # the last two merge: a stays stage 0
    assert kept_stages(W3, THREE, TpStageLayout(((0, 1), (1, 3)), tp=(1, 2))) == {0: 0}
    # the same layout: every group kept; another range or a split: rebuilt
    assert kept_stages(W3, THREE, TpStageLayout(THREE.layers, tp=(1, 1, 1))) == {
        0: 0, 1: 1, 2: 2}
    assert kept_stages(W3, THREE, TpStageLayout(((0, 2), (2, 3)), tp=(1, 1))) == {}
    tp2 = [_w("a", 0, 0, 2), _w("b", 0, 1, 2), _w("c", 1)]
    old = StageLayout(((0, 2), (2, 3)))
    assert kept_stages(tp2, old, TpStageLayout(((0, 2), (2, 3)), tp=(2, 1))) == {0: 0, 1: 1}
    # the tp-2 group splits (rebuilt); c keeps [2, 3) as stage 2 (was 1)
    assert kept_stages(tp2, old, TpStageLayout(((0, 1), (1, 2), (2, 3)), tp=(1, 1, 1))) == {
        2: 1}
    # a group of 2 whose slot now holds a rank of another group: rebuilt
    assert kept_stages(tp2, old, TpStageLayout(((0, 3),), tp=(3,))) == {}


def test_a_t5_stage_whose_onward_flag_would_change_is_rebuilt() -> None:
    enc = ((0, 1), (1, 2), (2, 3))
    old = StageLayout(THREE.layers, enc)
    # stage 0 of 3 hands the encoder output onward (0 + 2 < 3); as stage 0 of 2 it would not
    new = TpStageLayout(((0, 1), (1, 3)), ((0, 1), (1, 3)), tp=(1, 2))
    assert kept_stages(W3, old, new) == {}
    # the last stage stays the last (no onward either way): kept though its index moves
    merged = TpStageLayout(((0, 2), (2, 3)), ((0, 2), (2, 3)), tp=(2, 1))
    assert kept_stages(W3, old, merged) == {1: 2}


def test_a_tp_size_the_heads_cannot_split_is_refused_before_the_drain() -> None:
    def co(heads: int, kv: int, real: bool = True) -> Any:
        return SimpleNamespace(cfg=SimpleNamespace(model_config="m.json" if real else None),
                               model=SimpleNamespace(num_heads=heads, num_kv_heads=kv))

    check_heads(co(9, 3), (1, 3, 9))  # SmolLM2-135M
    with pytest.raises(ValueError, match=r"tp_size 2 .* possible tp sizes: \[1, 3, 9\]"):
        check_heads(co(9, 3), (2,))
    check_heads(co(9, 3, real=False), (2,))  # a null-model mesh: nothing to split
    check_heads(co(8, 2), (4, 8))  # more ranks than KV heads: those are replicated
    with pytest.raises(ValueError, match=r"tp_size 3 .*\(4 KV heads\)"):
        check_heads(co(12, 4), (3,))


def test_kept_groups_get_a_keep_assign_no_rendezvous_and_are_logged() -> None:
    co, workers, _ = _serving()
    workers.sent.clear()
    _first_token(co, workers)  # "a" runs on the old layout: migrated, re-run under its id
    workers.take(P.Assign)
    done: list[dict[str, Any]] = []
    _switch(co, TWO_TP1, 1, done)  # the same stages: both groups stay
    assigns = dict(workers.take(P.Assign))
    assert {r: (a.tp_rank, a.tp_size, a.layer_range, a.config["tp"])
            for r, a in assigns.items()} == {
        b"s0": (0, 1, (0, 1), {"group": None, "init": None, "keep": True}),
        b"s1": (0, 1, (1, 2), {"group": None, "init": None, "keep": True})}
    for worker in ("stage0", "stage1"):
        _ready(co, worker, {"relayout": 1, "reload_s": 0.001, "kept": True})
    co.schedule()
    [cost] = done
    assert cost["ok"] and "rendezvous_s" not in cost and cost["migrated_requests"] == 1
    assert cost["kept_groups"] == [
        {"stage": 0, "old_stage": 0, "group": "stage0", "workers": ["stage0"]},
        {"stage": 1, "old_stage": 1, "group": "stage1", "workers": ["stage1"]}]
    [(route, sp)] = workers.take(P.StagePass)  # "a" re-encoded on the kept stages
    assert route == b"s0" and sp.kind == "encode" and sp.req_ids == ("a",)
