"""tp_size changes live, end to end: two real stage worker processes of a tiny llama go from
two tp-1 stages to one tp-2 stage (a real gloo group formed live: rank 0 binds a fresh
rendezvous, the coordinator tells rank 1) and back, while requests stream; and (slow) a
launched tp-2 group split into two tp-1 stages and re-grouped.

The coordinator runs in this process (its own event loop, real sockets) so the test can start
the switch through the adapter's own path (``adapt_relayout.relayout_target`` / ``start``:
the one a drift re-plan takes) at a chosen moment instead of waiting for a detector. Every
request must be answered exactly once with transformers' greedy tokens, and each switch must
be logged as ``plan_switch`` with its cost.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from common.client import AsyncClient
from coordinator.config import CoordinatorConfig
from coordinator.planner.plan import Plan, WorkerGroup
from tests.runner.adaptmesh import (
    SHORT,
    assert_exactly_once,
    draw_work,
    reap,
    send_work,
    switch_now,
    wait_serving,
)
from tests.runner.tinymodels import hf_greedy, make_llama

# no drift fires by itself; drain timeout 0: the running requests are migrated (re-encoded
# on the new layout from prompt + tokens already streamed)
OPTIONS = "window=4096,min_samples=4096,drain_timeout_s=0"
ROOT = Path(__file__).resolve().parents[2]


class Log:
    """The coordinator's log, kept: (event, fields) in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **kw: self.events.append((event, kw))

    def of(self, name: str) -> list[dict[str, Any]]:
        return [kw for event, kw in self.events if event == name]


def _files(model: Path, tmp: Path, start_tp2: bool, ranks: int = 2,
           merged: tuple[WorkerGroup, ...] | None = None) -> tuple[Plan, Plan, CoordinatorConfig]:
    """The ``ranks`` tp-1 stages plan (the layers split evenly), the ``merged`` plan (default
    one tp-``ranks`` stage), and the adapting coordinator's config (serving the first, or the
    second when ``start_tp2``)."""
    from common.models.registry import load_model_spec
    from coordinator.planner.analytic import analytic_profile
    from coordinator.planner.planning import make_plan
    from coordinator.planner.workload import parse_workload

    cfg = load_model_spec(model).config
    total = cfg.num_layers
    profile = analytic_profile("a40", cfg, "float16", tp_sizes=(1, ranks))
    profile.save(tmp / "profile.json")
    plan = make_plan(parse_workload(SHORT), profile, ranks, 10.0, policy="rra")
    cuts = [total * i // ranks for i in range(ranks + 1)]
    plan = dataclasses.replace(plan, worker_groups=tuple(
        WorkerGroup("pipeline", 1, 1, (lo, hi)) for lo, hi in zip(cuts, cuts[1:], strict=False)),
        microbatches=ranks)
    merged = merged or (WorkerGroup("pipeline", ranks, ranks, (0, total)),)
    tp2 = dataclasses.replace(plan, worker_groups=merged, microbatches=len(merged))
    (tmp / "plan.json").write_text((tp2 if start_tp2 else plan).to_json())
    (tmp / "model.json").write_text(json.dumps(cfg.to_dict()))
    co_cfg = CoordinatorConfig(
        f"ipc://{tmp}/client", f"ipc://{tmp}/workers", policy="rra",
        pipeline_stages=1 if start_tp2 else ranks,
        max_encode_batch=8, n_d=plan.N_D or 1, heartbeat_interval_s=0.25,
        model_config=str(tmp / "model.json"), plan=str(tmp / "plan.json"),
        profile=str(tmp / "profile.json"), adapt=True, adapt_options=OPTIONS)
    return plan, tp2, co_cfg


def _workers(model: Path, tmp: Path, endpoint: str, tp2: bool,
             ranks: int = 2) -> list[subprocess.Popen[bytes]]:
    """``ranks`` stage worker processes: stages 0, 1, ..., or the ranks of one TP stage (a
    launch-time group: ids ``stage0.r<rank>``, ``--tp-init``)."""
    from coordinator.launch import free_port

    env = {**os.environ, "EXEGPT_RUNS_DIR": str(tmp / "runs"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    init = f"tcp://127.0.0.1:{free_port()}"
    out = []
    for i in range(ranks):
        place = (["--stage", "0", "--worker-id", f"stage0.r{i}", "--tp-rank", str(i),
                  "--tp-size", str(ranks), "--tp-init", init] if tp2 else
                 ["--stage", str(i), "--worker-id", f"stage{i}"])
        argv = [sys.executable, "-m", "decoder_worker", "--role", "pipeline", *place,
                "--coordinator", endpoint, "--model", str(model), "--dtype", "float32",
                "--kv-bind", f"ipc://{tmp}/kv{i}", "--heartbeat-interval", "0.25",
                "--heartbeat-timeout", "10"]
        out.append(subprocess.Popen(argv, env=env, cwd=ROOT))
    return out


def test_two_tp1_stages_become_one_tp2_stage_and_back_while_serving(tmp_path: Path) -> None:
    _round_trip(tmp_path, start_tp2=False)


def test_a_group_that_stays_is_kept_while_two_stages_merge(tmp_path: Path) -> None:
    """3 tp-1 stages [0, 1) + [1, 2) + [2, 3) -> one tp-2 stage [0, 2) + [2, 3) and back: the
    last stage's worker is kept both ways (no REGROUP, no rebuild; its stage index moves
    2 -> 1 -> 2, its next hop is the new first stage's); the answers stay transformers'."""
    out = _round_trip(tmp_path, start_tp2=False, ranks=3, merged=(
        WorkerGroup("pipeline", 2, 2, (0, 2)), WorkerGroup("pipeline", 1, 1, (2, 3))))
    assert out["there"]["kept_groups"] == [
        {"stage": 1, "old_stage": 2, "group": "stage2", "workers": ["stage2"]}]
    assert out["back"]["kept_groups"] == [
        {"stage": 2, "old_stage": 1, "group": "stage2", "workers": ["stage2"]}]


@pytest.mark.slow
def test_a_launched_tp2_group_splits_into_two_stages_and_regroups(tmp_path: Path) -> None:
    """The launch's own group (``--tp-init``, ids ``stage0.r0/.r1``) is dissolved too."""
    _round_trip(tmp_path, start_tp2=True)


def _round_trip(tmp_path: Path, start_tp2: bool, model: Path | None = None,
                reference: Callable[[Path, list[tuple[list[int], int]]], list[list[int]]] =
                hf_greedy, ranks: int = 2,
                merged: tuple[WorkerGroup, ...] | None = None) -> dict[str, Any]:
    """Serve, switch there and back with requests in flight; check each answer once and
    equal to ``reference``'s greedy tokens; returns the two switches' costs."""
    from coordinator.server import Coordinator

    model = model or make_llama(tmp_path / "llama", num_layers=4 if ranks == 2 else 3, seed=5)
    tp1, tp2, cfg = _files(model, tmp_path, start_tp2, ranks, merged)
    first, second = (tp1, tp2) if start_tp2 else (tp2, tp1)
    log = Log()
    work = draw_work(SHORT, 36, 3, "r")
    results: dict[str, list[int]] = {}
    procs: list[subprocess.Popen[bytes]] = []

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        co = Coordinator(cfg, log)
        runner = asyncio.create_task(co.run())
        procs.extend(_workers(model, tmp_path, cfg.worker_endpoint, start_tp2, ranks))
        try:
            await wait_serving(co, runner)
            async with AsyncClient(cfg.client_endpoint) as client:
                sending = asyncio.create_task(send_work(client, work, results, concurrency=4))
                while len(results) < 6:
                    await asyncio.sleep(0.05)
                there = await switch_now(co, first, "test: tp change")
                assert sorted((w.tp_rank, w.tp_size) for w in co.members.registry) == sorted(
                    (r, g.tp_size) for g in first.worker_groups for r in range(g.tp_size))
                n, passes = len(results), dict(co.pipeline.counters)
                while len(results) < min(len(work), n + 8):  # served by the new layout
                    await asyncio.sleep(0.05)
                assert co.pipeline.counters["decode_passes"] > passes["decode_passes"]
                back = await switch_now(co, second, "test: tp change")
                await sending
            return there, back
        finally:
            co.request_stop()
            await asyncio.wait_for(runner, 30)

    try:
        there, back = asyncio.run(scenario())
    finally:
        reap(procs)
    expected = reference(model, [(prompt, n) for _, prompt, n in work])
    assert_exactly_once(results, work, expected)
    layouts = [[{"role": "pipeline", "tp_size": g.tp_size, "layer_range": list(g.layer_range)}
                for g in plan.worker_groups] for plan in (tp2, tp1)]
    assert [s["new_layout"] for s in log.of("plan_switch")] == layouts[::-1 if start_tp2 else 1]
    assert [there["relayout"]["tp_sizes"], back["relayout"]["tp_sizes"]] == [
        [g["tp_size"] for g in layout] for layout in layouts[::-1 if start_tp2 else 1]]
    out = {"there": there["relayout"], "back": back["relayout"],
           "switch_s": [there["switch_s"], back["switch_s"]]}
    print(json.dumps(out))
    return out


@pytest.mark.slow
def test_smollm2_three_stages_become_one_tp3_stage_and_back(tmp_path: Path) -> None:
    """The real model (SmolLM2-135M GGUF, 30 layers, 9 heads: tp 2 does not divide them):
    [0, 10) + [10, 20) + [20, 30) <-> one tp-3 stage; each answer equals the engine's own
    in-process greedy tokens (-s prints the costs; tests/runner/measure_regroup.py repeats)."""
    from common.models.gguf_loader import default_gguf_path
    from tests.runner.measure_regroup import engine_greedy

    out = _round_trip(tmp_path, start_tp2=False, model=default_gguf_path(),
                      reference=engine_greedy, ranks=3)
    assert all(out[k]["reload_s_per_worker"] for k in ("there", "back"))
