"""tp_size changes live on a STAGED WAA mesh, end to end: four real stage worker processes of
a tiny llama go from encoder stages [0, 2) + [2, 4) and decoder stages [0, 2) + [2, 4) (all
tp-1) to one tp-2 encoder stage and one tp-2 decoder stage (two gloo groups formed live: each
rank 0 binds a fresh rendezvous, the coordinator tells its rank 1), and back, while requests
stream; running requests are migrated (drain timeout 0: re-run under a new wire id).

The coordinator runs in this process (as in test_relayout_tp_mesh) so the test starts each
switch through the adapter's own path (``adapt_relayout.relayout_target`` / ``start``) at a
chosen moment. Every request must be answered exactly once with transformers' greedy tokens,
each switch logged as ``plan_switch`` with its cost (``-s`` prints the costs).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
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
from tests.runner.test_relayout_tp_mesh import OPTIONS, ROOT, Log
from tests.runner.tinymodels import hf_greedy, make_llama

NAMES = ("enc0", "enc1", "dec0", "dec1")
TP1 = (("encoder", 1, (0, 2)), ("encoder", 1, (2, 4)), ("decoder", 1, (0, 2)),
       ("decoder", 1, (2, 4)))
TP2 = (("encoder", 2, (0, 4)), ("decoder", 2, (0, 4)))
MIXED = (("encoder", 2, (0, 4)), ("decoder", 1, (0, 2)), ("decoder", 1, (2, 4)))


def _plan(base: Plan, groups: tuple[tuple[str, int, tuple[int, int]], ...]) -> Plan:
    return dataclasses.replace(base, worker_groups=tuple(
        WorkerGroup(role, tp, tp, rng) for role, tp, rng in groups), B_m=2, microbatches=2)


def _files(model: Path, tmp: Path, launched_tp2: bool) -> tuple[Plan, CoordinatorConfig]:
    """The served WAA-C plan (all tp-1, or MIXED: a launched tp-2 encoder group) and the
    adapting coordinator's config."""
    from common.models.registry import config_from_hf, read_hf_config
    from coordinator.planner.analytic import analytic_profile
    from coordinator.planner.planning import make_plan
    from coordinator.planner.workload import parse_workload

    cfg = config_from_hf(read_hf_config(model))
    profile = analytic_profile("a40", cfg, "float16", tp_sizes=(1, 2))
    profile.save(tmp / "profile.json")
    plan = _plan(make_plan(parse_workload(SHORT), profile, 4, 10.0, policy="waa-c"),
                 MIXED if launched_tp2 else TP1)
    (tmp / "plan.json").write_text(plan.to_json())
    (tmp / "model.json").write_text(json.dumps(cfg.to_dict()))
    co_cfg = CoordinatorConfig(
        f"ipc://{tmp}/client", f"ipc://{tmp}/workers", policy="waa", streams=2,
        waa_encoder_layers="0:4" if launched_tp2 else "0:2,2:4", waa_decoder_layers="0:2,2:4",
        max_encode_batch=8, heartbeat_interval_s=0.25,
        model_config=str(tmp / "model.json"), plan=str(tmp / "plan.json"),
        profile=str(tmp / "profile.json"), adapt=True, adapt_options=OPTIONS)
    return plan, co_cfg


def _workers(model: Path, tmp: Path, endpoint: str,
             launched_tp2: bool) -> list[subprocess.Popen[bytes]]:
    """Four stage worker processes, each with a KV endpoint: tp-1 global stages 0-3, or a
    launch-time tp-2 encoder group (ids ``enc0.r<rank>``, ``--tp-init``) + stages 1-2."""
    from coordinator.launch import free_port

    env = {**os.environ, "EXEGPT_RUNS_DIR": str(tmp / "runs"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    init = f"tcp://127.0.0.1:{free_port()}"
    places = ([("enc0.r0", 0, ["--tp-rank", "0", "--tp-size", "2", "--tp-init", init]),
               ("enc0.r1", 0, ["--tp-rank", "1", "--tp-size", "2", "--tp-init", init]),
               ("dec0", 1, []), ("dec1", 2, [])] if launched_tp2 else
              [(name, s, []) for s, name in enumerate(NAMES)])
    out = []
    for name, s, tp in places:
        argv = [sys.executable, "-m", "decoder_worker", "--role", "pipeline", "--stage", str(s),
                *tp, "--worker-id", name, "--coordinator", endpoint, "--model", str(model),
                "--dtype", "float32", "--capacity", "16", "--kv-bind", f"ipc://{tmp}/kv-{name}",
                "--heartbeat-interval", "0.25", "--heartbeat-timeout", "10"]
        out.append(subprocess.Popen(argv, env=env, cwd=ROOT))
    return out


def test_both_pipelines_become_tp2_stages_and_back_while_serving(tmp_path: Path) -> None:
    _round_trip(tmp_path, (TP2, TP1), 36)


@pytest.mark.slow
def test_encoder_alone_regroups_then_the_decoder_follows(tmp_path: Path) -> None:
    """One side at a time: the decoder stages stay tp-1 (rebuilt in place) while the encoder
    becomes a tp-2 stage; then the decoders re-group too; then back to four tp-1 stages."""
    _round_trip(tmp_path, (MIXED, TP2, TP1), 60)


@pytest.mark.slow
def test_a_launched_tp2_encoder_group_splits_and_regroups(tmp_path: Path) -> None:
    """The launch's own group (``--tp-init``, ids ``enc0.r0/.r1``) is dissolved too: its
    follower leaves at the REGROUP header and becomes encoder stage 1."""
    _round_trip(tmp_path, (TP1, MIXED), 36, launched_tp2=True)


def _round_trip(tmp_path: Path, layouts: tuple[Any, ...], num: int,
                launched_tp2: bool = False) -> None:
    from coordinator.server import Coordinator

    model = make_llama(tmp_path / "llama4", num_layers=4, seed=5)
    served, cfg = _files(model, tmp_path, launched_tp2)
    plans = [_plan(served, groups) for groups in layouts]
    log = Log()
    work = draw_work(SHORT, num, 3, "r")
    results: dict[str, list[int]] = {}
    procs: list[subprocess.Popen[bytes]] = []

    async def scenario() -> list[dict[str, Any]]:
        co = Coordinator(cfg, log)
        runner = asyncio.create_task(co.run())
        procs.extend(_workers(model, tmp_path, cfg.worker_endpoint, launched_tp2))
        switches = []
        try:
            await wait_serving(co, runner)
            async with AsyncClient(cfg.client_endpoint) as client:
                sending = asyncio.create_task(send_work(client, work, results, concurrency=6))
                step = max(4, len(work) // (len(plans) + 1))
                for i, plan in enumerate(plans):
                    while len(results) < (i + 1) * step - 2:  # in flight when it starts
                        await asyncio.sleep(0.05)
                    passes = co.pipeline.counters["decode_passes"]
                    switches.append(await switch_now(co, plan, "test: tp change"))
                    want = sorted((w.stage, w.tp_rank, w.tp_size) for w in co.members.registry)
                    assert want == _ranks(plan)
                    n = len(results)
                    while len(results) < min(len(work), n + 4):  # served by the new layout
                        await asyncio.sleep(0.05)
                    assert co.pipeline.counters["decode_passes"] > passes
                await sending
            return switches
        finally:
            co.request_stop()
            await asyncio.wait_for(runner, 30)

    try:
        switches = asyncio.run(scenario())
    finally:
        reap(procs)
    assert [p.returncode for p in procs] == [0, 0, 0, 0]
    expected = hf_greedy(model, [(prompt, n) for _, prompt, n in work])
    assert_exactly_once(results, work, expected)
    logged = log.of("plan_switch")
    assert [s["new_layout"] for s in logged] == [
        [{"role": g.role, "tp_size": g.tp_size, "layer_range": list(g.layer_range)}
         for g in plan.worker_groups] for plan in plans]
    for plan, switch in zip(plans, switches, strict=True):
        cost = switch["relayout"]
        assert cost["tp_sizes"] == {side: [g.tp_size for g in plan.worker_groups
                                           if g.role == side] for side in ("encoder", "decoder")}
        assert cost["pause_s"] >= cost["reload_s"] > 0 and len(cost["reload_s_per_worker"]) == 4
    print(json.dumps([{"tp": s["relayout"]["tp_sizes"], "switch_s": s["switch_s"],
                       **{k: s["relayout"].get(k) for k in (
                           "drained_requests", "migrated_requests", "rerun_tokens", "drain_s",
                           "rendezvous_s", "reload_s", "reassign_s", "pause_s")}}
                      for s in switches]))


def _ranks(plan: Plan) -> list[tuple[int, int, int]]:
    """(stage, rank, size) of every worker the plan's layout places."""
    return sorted((s, r, g.tp_size) for s, g in enumerate(plan.worker_groups)
                  for r in range(g.tp_size))
