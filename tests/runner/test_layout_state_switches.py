"""The layout state holds the plan being served, whatever switch adopted it.

A WAA role switch (coordinator.adapt_roles: whole-model workers change role) and a knob-only
switch (coordinator.adapt_knobs.apply_knobs: B_E, N_D, thresholds) are written to the state
like a re-layout; a restarted coordinator then serves that plan (its split, its knobs) and a
switched worker's Hello gets its new role's capacity. The re-layout's own state:
tests/runner/test_layout_state.py; with real processes: tests/runner/test_restart_after_switch.py.
"""

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
from coordinator.adapt_knobs import apply_knobs
from coordinator.adapt_roles import finish, served_plan
from coordinator.adjust import BatchSizer
from coordinator.config import CoordinatorConfig
from coordinator.planner.plan import Plan, WorkerGroup
from coordinator.registry import Registry, WorkerInfo
from coordinator.streams import Stream, StreamKnobs
from tests.runner.adaptmesh import LONG, SHORT
from tests.runner.test_layout_state import Log

MODEL = ModelConfig.preset("tiny-llama")  # 2 layers


def _plan(spec: str, policy: str, workers: int) -> Plan:
    from coordinator.planner.analytic import analytic_profile
    from coordinator.planner.planning import make_plan
    from coordinator.planner.workload import parse_workload

    profile = analytic_profile("a40", MODEL, "float16", tp_sizes=(1,))
    return make_plan(parse_workload(spec), profile, workers, 10.0, policy=policy)


def _waa(tmp: Path) -> tuple[Plan, Plan, Any]:
    """A whole-model WAA mesh launched 1 encoder + 3 decoders; the switched plan is 2 + 2."""
    launch = served_plan(_plan(SHORT, "waa-c", 4), (1, 3), MODEL)
    switched = dataclasses.replace(served_plan(_plan(LONG, "waa-c", 4), (2, 2), MODEL), B_E=5)
    (tmp / "plan.json").write_text(launch.to_json())
    cfg = CoordinatorConfig(f"ipc://{tmp}/c", f"ipc://{tmp}/w", policy="waa", num_encoders=1,
                            num_decoders=3, plan=str(tmp / "plan.json"),
                            profile="analytic:a40:x", adapt=True)
    registry = Registry()
    roles = {"enc0": ("encoder", 8), "dec0": ("encoder", 8),  # switched: the encoders' capacity
             "dec1": ("decoder", 64), "dec2": ("decoder", 64)}
    for worker, (role, capacity) in roles.items():
        registry.add(WorkerInfo(worker, role, worker.encode(), 0, 1, "cpu", capacity, None,
                                0.0))
    members = SimpleNamespace(registry=registry, exits=SimpleNamespace(_fds={}),
                              _pids={w: 1000 + i for i, w in enumerate(roles)})
    metrics = SimpleNamespace(plan=None, set_plan=lambda plan, event=None: None)
    co = SimpleNamespace(cfg=cfg, model=MODEL, log=Log(), members=members, pipeline=None,
                         sizer=BatchSizer(launch.B_E, cap=64), metrics=metrics, resumed=None,
                         schedule=lambda: None)
    co.adapter = SimpleNamespace(co=co, plan=launch, relayouts=1, switches=[])
    return launch, switched, co


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LS.STATE_ENV, raising=False)


def test_a_role_switch_is_saved_and_a_restart_serves_its_split_and_knobs(
        tmp_path: Path) -> None:
    launch, switched, co = _waa(tmp_path)
    finish(co.adapter, switched, {"reason": "drift", "t_fire": 0.0}, {"ok": True})
    path = tmp_path / "plan.layout.json"
    state = json.loads(path.read_text())
    assert state["stages"] is None and state["epoch"] == 1 and state["plan"]["B_E"] == 5
    assert {w: (p["role"], p["capacity"]) for w, p in state["workers"].items()} == {
        "enc0": ("encoder", 8), "dec0": ("encoder", 8), "dec1": ("decoder", 64),
        "dec2": ("decoder", 64)}
    log = Log()
    cfg, resumed = LS.resume(co.cfg, MODEL, log)  # the launch flags, the original --plan
    assert log.names() == ["layout_state_resumed"] and resumed is not None
    assert (cfg.num_encoders, cfg.num_decoders, cfg.max_encode_batch) == (2, 2, 5)
    from coordinator.drift import DriftConfig

    adapter = SimpleNamespace(plan=launch, relayouts=0, detector=None,
                              cfg=SimpleNamespace(drift=DriftConfig()))
    restarted = SimpleNamespace(resumed=resumed, adapter=adapter, pipeline=None,
                                sizer=BatchSizer(launch.B_E, cap=64), metrics=None)
    written = path.read_text()
    LS.restore(restarted)
    assert adapter.plan == switched and adapter.relayouts == 1
    assert restarted.sizer.plan_batch == 5 and adapter.detector is not None
    assert path.read_text() == written  # restore does not write


def test_a_knob_only_switch_is_saved_with_the_layout_it_keeps(tmp_path: Path) -> None:
    """Pipeline: no re-layout yet (epoch 0), the launch stages, the new B_E and N_D."""
    from coordinator.pipeline_driver import StageLayout

    launch = dataclasses.replace(_plan(SHORT, "rra", 2), worker_groups=(
        WorkerGroup("pipeline", 1, 1, (0, 1)), WorkerGroup("pipeline", 1, 1, (1, 2))))
    (tmp_path / "plan.json").write_text(launch.to_json())
    cfg = CoordinatorConfig(f"ipc://{tmp_path}/c", f"ipc://{tmp_path}/w", policy="rra",
                            pipeline_stages=2, plan=str(tmp_path / "plan.json"),
                            profile="analytic:a40:x", adapt=True)
    registry = Registry()
    for stage in (0, 1):
        registry.add(WorkerInfo(f"stage{stage}", "pipeline", b"s%d" % stage, 0, 1, "cpu", 8,
                                None, 0.0, stage=stage))
    streams = [Stream(i, StreamKnobs("rra", launch.B_E, 1)) for i in range(2)]
    pipeline = SimpleNamespace(layout=StageLayout(((0, 1), (1, 2))), streams=streams,
                               switching=False)
    co = SimpleNamespace(cfg=cfg, model=MODEL, log=Log(), pipeline=pipeline, resumed=None,
                         members=SimpleNamespace(registry=registry, _pids={},
                                                 exits=SimpleNamespace(_fds={})),
                         sizer=BatchSizer(launch.B_E, cap=64),
                         adapter=SimpleNamespace(relayouts=0))
    knobs = dataclasses.replace(launch, B_E=launch.B_E + 3, N_D=4)
    apply_knobs(co, knobs)  # adapt.Adapter.apply's knob-only switch
    state = json.loads((tmp_path / "plan.layout.json").read_text())
    assert (state["epoch"], state["stages"], state["streams"]) == (0, [[0, 1], [1, 2]], 2)
    assert (state["plan"]["B_E"], state["plan"]["N_D"]) == (launch.B_E + 3, 4)
    assert co.log.names() == ["layout_state_saved"]
    apply_knobs(co, knobs)  # the same plan again: nothing to write
    pipeline.switching = True
    apply_knobs(co, launch)  # a re-layout in progress commits its own state at its end
    apply_knobs(co, launch, durable=False)
    assert co.log.names() == ["layout_state_saved"]
    cfg2, resumed = LS.resume(cfg, MODEL, Log())
    assert resumed is not None and (cfg2.max_encode_batch, cfg2.n_d, cfg2.stage_layers,
                                    cfg2.streams) == (launch.B_E + 3, 4, "0:1,1:2", 2)
    co.cfg = dataclasses.replace(cfg, adapt=False)  # not adapting: no state at all
    pipeline.switching = False
    (tmp_path / "plan.layout.json").unlink()
    apply_knobs(co, launch)
    assert not (tmp_path / "plan.layout.json").exists()


def test_a_switched_worker_rejoining_gets_its_recorded_role_capacity(tmp_path: Path) -> None:
    """Its Hello names its current role (the one it built) but its launch capacity."""
    from coordinator.membership import Membership
    from coordinator.server import Coordinator
    from tests.runner.test_pipeline_driver import Sock

    _, switched, co = _waa(tmp_path)
    finish(co.adapter, switched, {"reason": "drift", "t_fire": 0.0}, {"ok": True})
    cfg, resumed = LS.resume(co.cfg, MODEL, Log())
    restarted = Coordinator(dataclasses.replace(cfg, adapt=False), Log())
    workers = Sock()
    restarted.members = Membership(restarted, workers)  # type: ignore[arg-type]
    restarted.resumed = resumed
    hello = {"worker_id": "dec0", "role": "encoder", "kv_endpoint": "ipc:///tmp/kv",
             "capacity": {"max_seqs": 64}}
    restarted.members.on_hello(b"a", P.Hello(**hello, pid=1001))  # the switched process
    assert restarted.members.registry.get("dec0").capacity == 8  # type: ignore[union-attr]
    restarted.members.on_hello(b"b", P.Hello(**{**hello, "worker_id": "dec1",
                                                "role": "decoder"}, pid=4242))  # another pid
    assert restarted.members.registry.get("dec1").capacity == 64  # type: ignore[union-attr]
    place = LS.placed(restarted, P.Hello(**{**hello, "role": "decoder"}, pid=1001))
    assert place is None  # a role other than the recorded one: not the process recorded
    assert [m.role for _, m in workers.take(P.Assign)] == ["encoder", "decoder"]


def test_whole_model_states_are_validated(tmp_path: Path) -> None:
    _, switched, co = _waa(tmp_path)
    state = LS.capture(co, switched, 1, 1)
    assert state.whole_model and state.counts == (2, 2)
    assert LS.LayoutState.from_json(state.to_json()) == state
    with pytest.raises(ValueError, match="without stages"):
        dataclasses.replace(state, stages=[[0, 2]])
    with pytest.raises(ValueError, match=">= 1 encoder and decoder"):
        dataclasses.replace(state, workers={w: dataclasses.replace(p, role="decoder")
                                            for w, p in state.workers.items()})
    with pytest.raises(ValueError, match="mixes"):
        dataclasses.replace(state, workers={**state.workers, "s": LS.Placement(0)})
    with pytest.raises(ValueError, match="holds no stage"):
        LS.Placement(0, role="encoder")
    with pytest.raises(ValueError, match="capacity"):
        LS.Placement(None, role="decoder", capacity=0)
    with pytest.raises(ValueError, match="role"):
        LS.Placement(None, role="pilot")
    assert LS.mismatch(dataclasses.replace(state, plan_sha="x"), co.cfg, MODEL) is not None
    assert LS.mismatch(state, co.cfg, MODEL) is None
    assert os.path.exists(co.cfg.plan)
