"""The layout state file (coordinator.layout_state): written atomically after a live switch,
validated and applied when a coordinator starts, its placements matched to rejoining workers.
The end-to-end restart with real processes: tests/runner/test_drift_tp_mesh.py (slow)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from common import protocol as P
from common.models.config import ModelConfig
from coordinator import layout_state as LS
from coordinator.config import CoordinatorConfig
from coordinator.pipeline_driver import StageLayout
from coordinator.planner.plan import Plan, WorkerGroup
from coordinator.registry import Registry, WorkerInfo
from tests.runner.adaptmesh import LONG, SHORT

MODEL = ModelConfig.preset("tiny-llama")  # 2 layers


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **kw: self.events.append((event, kw))

    def names(self) -> list[str]:
        return [e for e, _ in self.events]


def _plans(tmp: Path) -> tuple[Plan, Plan, CoordinatorConfig]:
    """The launch plan (two tp-1 stages, in plan.json) and an adopted one (one tp-2 stage)."""
    from coordinator.planner.analytic import analytic_profile
    from coordinator.planner.planning import make_plan
    from coordinator.planner.workload import parse_workload

    profile = analytic_profile("a40", MODEL, "float16", tp_sizes=(1, 2))
    plan = make_plan(parse_workload(SHORT), profile, 2, 10.0, policy="rra")
    launch = dataclasses.replace(plan, worker_groups=(WorkerGroup("pipeline", 1, 1, (0, 1)),
                                                      WorkerGroup("pipeline", 1, 1, (1, 2))),
                                 microbatches=2)
    adopted = dataclasses.replace(make_plan(parse_workload(LONG), profile, 2, 10.0, policy="rra"),
                                  worker_groups=(WorkerGroup("pipeline", 2, 2, (0, 2)),),
                                  microbatches=1, B_E=7, N_D=3)
    (tmp / "plan.json").write_text(launch.to_json())
    cfg = CoordinatorConfig(f"ipc://{tmp}/c", f"ipc://{tmp}/w", policy="rra", pipeline_stages=2,
                            n_d=1, plan=str(tmp / "plan.json"), profile="analytic:a40:x",
                            adapt=True)
    return launch, adopted, cfg


def _co(cfg: CoordinatorConfig, pids: dict[str, int]) -> Any:
    """A coordinator after the switch to one tp-2 stage: what commit() reads of it."""
    registry = Registry()
    for rank, worker in enumerate(("stage0", "stage1")):
        registry.add(WorkerInfo(worker, "pipeline", worker.encode(), rank, 2, "cpu", 8, None,
                                0.0, stage=0, tp_group="e1.s0"))
    members = SimpleNamespace(registry=registry, _pids=pids,
                              exits=SimpleNamespace(_fds={"stage0": (1, 2), "stage1": (3, 4)}))
    return SimpleNamespace(cfg=cfg, model=MODEL, log=Log(), members=members,
                           pipeline=SimpleNamespace(layout=StageLayout(((0, 2),))))


def _hello(worker: str, pid: int, rank: int, size: int) -> P.Hello:
    return P.Hello(worker_id=worker, role="pipeline", tp_rank=rank, tp_size=size, device="cpu",
                   pid=pid, host="h", kv_endpoint=None, capacity={"max_seqs": 8, "stage": rank})


@pytest.fixture
def committed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Plan, Path]:
    monkeypatch.delenv(LS.STATE_ENV, raising=False)
    live = {os.getpid(), os.getppid()}  # these two stand for the worker processes
    monkeypatch.setattr(LS, "worker_alive", lambda pid, host: pid in live)
    _, adopted, cfg = _plans(tmp_path)
    co = _co(cfg, {"stage0": os.getpid(), "stage1": os.getppid()})
    LS.commit(co, adopted, 1, 1)
    return co, adopted, tmp_path / "plan.layout.json"


def test_a_committed_layout_is_resumed_by_a_restarted_coordinator(
        committed: tuple[Any, Plan, Path]) -> None:
    co, adopted, path = committed
    assert co.log.names() == ["layout_state_saved"] and path.is_file()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".plan.layout")]
    log = Log()
    cfg, resumed = LS.resume(co.cfg, MODEL, log)  # the same launch flags and --plan
    assert log.names() == ["layout_state_resumed"] and resumed is not None
    assert (cfg.pipeline_stages, cfg.stage_layers, cfg.streams, cfg.n_d,
            cfg.max_encode_batch) == (1, "0:2", 1, 3, 7)
    assert resumed.state.plan == adopted.to_dict() and resumed.state.epoch == 1
    # the same processes get their recorded place (and TP group); any other is a new worker
    restarted = SimpleNamespace(resumed=resumed)
    place = LS.placed(restarted, _hello("stage1", os.getppid(), 1, 2))
    assert place is not None and (place.stage, place.tp_group) == (0, "e1.s0")
    assert LS.placed(restarted, _hello("stage1", 12345678, 1, 2)) is None  # another process
    assert LS.placed(restarted, _hello("stage1", os.getppid(), 0, 1)) is None  # launch flags
    assert LS.placed(restarted, _hello("stage9", os.getppid(), 1, 2)) is None


def test_a_state_for_other_workers_model_or_plan_is_ignored_with_the_reason(
        committed: tuple[Any, Plan, Path]) -> None:
    co, _, path = committed
    cases = {
        "another model": (dataclasses.replace(MODEL, num_layers=4), co.cfg),
        "is gone": (MODEL, co.cfg),  # stage0's recorded pid is dead (below)
    }
    state = json.loads(path.read_text())
    state["workers"]["stage0"]["pid"] = 2**22 + 12345  # beyond pid_max: no such process
    path.write_text(json.dumps(state))
    for why, (model, cfg) in cases.items():
        log = Log()
        out, resumed = LS.resume(cfg, model, log)
        assert resumed is None and out == cfg
        assert log.names() == ["layout_state_ignored"] and why in log.events[0][1]["why"]
    state["workers"]["stage0"]["pid"] = os.getpid()
    path.write_text(json.dumps(state))
    Path(co.cfg.plan).write_text(Path(co.cfg.plan).read_text() + " ")  # another --plan
    log = Log()
    assert LS.resume(co.cfg, MODEL, log)[1] is None and "another --plan" in str(log.events)


def test_a_corrupt_or_foreign_state_file_is_ignored(committed: tuple[Any, Plan, Path]) -> None:
    co, _, path = committed
    good = path.read_text()
    for text in (good[: len(good) // 2], "[]", json.dumps({"version": 99}),
                 good.replace('"epoch": 1', '"epoch": -1'), good.replace('"B_E"', '"B_X"')):
        path.write_text(text)
        log = Log()
        cfg, resumed = LS.resume(co.cfg, MODEL, log)
        assert resumed is None and cfg == co.cfg and log.names() == ["layout_state_ignored"]


def test_write_is_atomic_a_failed_write_keeps_the_old_state(
        committed: tuple[Any, Plan, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    co, adopted, path = committed
    before = path.read_text()

    def broken(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken)
    LS.commit(co, dataclasses.replace(adopted, B_E=9), 2, 1)
    assert co.log.names()[-1] == "layout_state_write_failed"
    assert path.read_text() == before  # the reader sees the old state, whole
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []


def test_where_the_state_lives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LS.STATE_ENV, raising=False)
    _, _, cfg = _plans(tmp_path)
    assert LS.state_path(cfg) == tmp_path / "plan.layout.json"
    assert LS.state_path(dataclasses.replace(cfg, adapt=False)) is None  # never re-lays out
    monkeypatch.setenv(LS.STATE_ENV, str(tmp_path / "s" / "x.json"))
    assert LS.state_path(cfg) == tmp_path / "s" / "x.json"
    monkeypatch.setenv(LS.STATE_ENV, "off")
    assert LS.state_path(cfg) is None


def test_a_clean_stop_clears_the_state(committed: tuple[Any, Plan, Path]) -> None:
    co, _, path = committed
    LS.clear(co)
    assert not path.exists() and co.log.names()[-1] == "layout_state_cleared"
    assert LS.resume(co.cfg, MODEL, Log()) == (co.cfg, None)  # no file: the launch layout


def test_a_staged_waa_state_sets_the_waa_ranges(committed: tuple[Any, Plan, Path]) -> None:
    co, adopted, _ = committed
    state = dataclasses.replace(LS.capture(co, adopted, 3, 2), policy="waa",
                                stages={"encoder": [[0, 2]], "decoder": [[0, 1], [1, 2]]})
    waa = dataclasses.replace(co.cfg, policy="waa", num_encoders=1, num_decoders=1)
    cfg = LS.apply(waa, LS.LayoutState.from_json(state.to_json()))
    assert (cfg.waa_encoder_layers, cfg.waa_decoder_layers, cfg.streams) == ("0:2", "0:1,1:2", 2)
    with pytest.raises(ValueError, match="encoder and decoder"):
        dataclasses.replace(state, stages={"encoder": [], "decoder": [[0, 2]]})
    # a restarted staged WAA coordinator: the driver's layout and B_m from the state, and
    # the TP stage sizes a live re-group left (restore)
    from coordinator.server import Coordinator

    tp_state = dataclasses.replace(state, tp=[2, 1, 1])
    restarted = Coordinator(dataclasses.replace(cfg, adapt=False), Log())
    restarted.resumed = LS.Resumed(Path("unused"), tp_state)
    LS.restore(restarted)
    layout = restarted.pipeline.layout  # type: ignore[union-attr]
    assert (layout.encoder, layout.decoder, layout.tp) == (((0, 2),), ((0, 1), (1, 2)),
                                                           (2, 1, 1))
    assert len(restarted.pipeline.micro) == 2 and restarted.sizer.plan_batch == adopted.B_E


def test_restore_puts_the_adopted_plan_in_the_adapter(committed: tuple[Any, Plan, Path]) -> None:
    from coordinator.adjust import BatchSizer
    from coordinator.drift import DriftConfig
    from coordinator.streams import Stream, StreamKnobs

    co, adopted, _ = committed
    _, resumed = LS.resume(co.cfg, MODEL, Log())
    adapter = SimpleNamespace(plan=None, relayouts=0, detector=None,
                              cfg=SimpleNamespace(drift=DriftConfig()))
    metrics = SimpleNamespace(plan=None, set_plan=lambda plan: setattr(metrics, "plan", plan))
    pipeline = SimpleNamespace(streams=[Stream(0, StreamKnobs("rra", 1, 1))])
    restarted = SimpleNamespace(resumed=resumed, adapter=adapter, metrics=metrics,
                                pipeline=pipeline, sizer=BatchSizer(1, cap=64))
    LS.restore(restarted)
    assert adapter.plan == adopted and adapter.relayouts == 1 and metrics.plan == adopted.to_dict()
    assert adapter.detector.reference is not None
    assert (pipeline.streams[0].knobs.batch, pipeline.streams[0].knobs.n_d) == (7, 3)
    assert restarted.sizer.plan_batch == 7


def test_a_rejoining_spare_and_a_moved_stage_get_the_place_they_hold(tmp_path: Path) -> None:
    """A restarted coordinator with a state of one stage [0, 2) + one spare: the spare's Hello
    names its launch stage 1 (out of range now) and gets its spare Assign, the same placement
    as the re-layout gave it (common.workerlink PLACEMENT), so its check passes."""
    from common.workerlink import PLACEMENT
    from coordinator.membership import Membership
    from coordinator.server import Coordinator
    from tests.runner.test_pipeline_driver import Sock

    co = Coordinator(CoordinatorConfig("ipc:///tmp/c", "ipc:///tmp/w", policy="rra",
                                       pipeline_stages=1, stage_layers="0:2"), Log())
    workers = Sock()
    co.members = Membership(co, workers)  # type: ignore[arg-type]
    state = LS.LayoutState(
        policy="rra", plan={"B_E": 4}, epoch=2, stages=[[0, 2]], streams=1,
        workers={"stage0": LS.Placement(0, pid=111), "stage1": LS.Placement(None, pid=222)},
        model_sha=LS.model_sha(co.model), plan_sha="x")
    co.resumed = LS.Resumed(tmp_path / "s.json", state)
    for stage, pid in ((0, 111), (1, 222)):
        co.members.on_hello(f"s{stage}".encode(), P.Hello(
            worker_id=f"stage{stage}", role="pipeline", pid=pid, capacity={"stage": stage}))
    sent = dict(workers.take(P.Assign))
    spare = co.members.registry.get("stage1")
    assert spare is not None and spare.stage is None and sent[b"s0"].layer_range == (0, 2)
    held = co.pipeline.relayout_assign(spare, 2)  # what the worker built at the re-layout
    assert all(getattr(sent[b"s1"], k) == getattr(held, k) for k in PLACEMENT)
    assert sent[b"s1"].config["pipeline"] is None and sent[b"s1"].group == -1
    assert not workers.take(P.Error)  # nobody refused
    # another process with the spare's id (restarted with its launch flags): a Hello stage
    co.members.on_hello(b"s9", P.Hello(worker_id="stage1", role="pipeline", pid=999,
                                       capacity={"stage": 0}))
    assert co.members.registry.get("stage1").stage == 0  # type: ignore[union-attr]


def test_a_replacement_joining_rewrites_the_state_with_its_pid(
        committed: tuple[Any, Plan, Path]) -> None:
    co, adopted, path = committed
    co.resumed = LS.resume(co.cfg, MODEL, Log())[1]
    co.adapter = SimpleNamespace(plan=adopted)
    co.pipeline.switching = False
    co.members._pids["stage1"] = 4242  # noqa: SLF001 - a replacement process registered
    LS.refresh(co)
    state = json.loads(path.read_text())
    assert state["workers"]["stage1"]["pid"] == 4242 and state["epoch"] == 1


def test_a_t5_pipeline_state_sets_both_stacks_ranges(committed: tuple[Any, Plan, Path]) -> None:
    """A restarted coordinator after a live T5 re-layout names the adopted encoder-stack
    ranges too, not the launch ones (the workers' placement check compares both)."""
    co, adopted, _ = committed
    state = LS.capture(co, adopted, 3, 2)
    groups = [{"role": "pipeline", "count": 1, "tp_size": 1, "layer_range": [0, 1],
               "encoder_layer_range": [0, 3]},
              {"role": "pipeline", "count": 1, "tp_size": 1, "layer_range": [1, 2],
               "encoder_layer_range": [3, 4]}]
    state = dataclasses.replace(state, plan={**state.plan, "worker_groups": groups},
                                stages=[[0, 1], [1, 2]], tp=[1, 1])
    cfg = LS.apply(co.cfg, LS.LayoutState.from_json(state.to_json()))
    assert (cfg.stage_layers, cfg.stage_encoder_layers) == ("0:1,1:2", "0:3,3:4")
    mismatched = LS.apply(co.cfg, LS.LayoutState.from_json(  # not one range per stage: kept
        dataclasses.replace(state, plan={**state.plan, "worker_groups": groups[:1]}).to_json()))
    assert mismatched.stage_encoder_layers is None
