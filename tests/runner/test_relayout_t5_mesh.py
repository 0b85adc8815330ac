"""T5 stages re-laid out live, end to end: two real stage worker processes of a tiny T5 (4
encoder, 3 decoder layers) serving an RRA pipeline get other encoder AND decoder layer ranges
while requests stream, then the launch ranges again; each rebuilds from its host-memory copy of
both stacks. Slow: the same for a staged WAA-C mesh of three stage workers (another split of
the encoder stack over the encoder stages and of the decoder stack over the decoder stages),
and the two tp-1 T5 stages re-grouped into one tp-2 stage and back.

The coordinator runs in this process so the test starts the switch through the adapter's own
path (``adapt_relayout.relayout_target`` / ``start``, the one a drift re-plan takes) at a
chosen moment. Drain timeout 0: the running requests are migrated, i.e. re-run from their
prompt on the new layout, the tokens the client already has replayed and checked, not sent
twice. Every request must be answered exactly once with transformers' greedy tokens.
"""

from __future__ import annotations

import asyncio
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
    reap,
    send_work,
    switch_now,
    wait_serving,
)
from tests.runner.test_relayout_tp_mesh import Log
from tests.runner.test_t5_stages import VOCAB, make_t5_43
from tests.runner.tinymodels import hf_greedy, workload

OPTIONS = "window=4096,min_samples=4096,drain_timeout_s=0"  # no drift fires by itself
ROOT = Path(__file__).resolve().parents[2]
Split = tuple[tuple[str, tuple[int, int], tuple[int, int] | None], ...]
# per group: (role, decoder layers, encoder layers)
LAUNCH = (("pipeline", (0, 2), (0, 2)), ("pipeline", (2, 3), (2, 4)))
OTHER = (("pipeline", (0, 1), (0, 1)), ("pipeline", (1, 3), (1, 4)))
WAA_LAUNCH = (("encoder", (0, 0), (0, 4)), ("decoder", (0, 1), None),
              ("decoder", (1, 3), None))
WAA_OTHER = (("encoder", (0, 0), (0, 2)), ("encoder", (0, 0), (2, 4)),
             ("decoder", (0, 3), None))
TP2 = (("pipeline", (0, 3), (0, 4)),)  # one tp-2 stage: both ranks hold every layer
PLANS = {"pipeline": (LAUNCH, OTHER), "waa": (WAA_LAUNCH, WAA_OTHER), "tp": (LAUNCH, TP2)}


def _plan(model: dict[str, Any], split: Split, policy: str = "rra") -> Plan:
    """A plan of one group per stage, each (role, decoder layers, encoder layers); tp-1
    stages, or one tp-2 stage when the split has a single stage (TP2)."""
    tp = 2 if len(split) == 1 else 1
    return Plan(policy=policy, model=model, workload=SHORT, latency_bound_s=10.0, sla="b",
                num_workers=2 if tp == 2 else len(split), worker_groups=tuple(
                    WorkerGroup(role, tp, tp, dec, enc) for role, dec, enc in split),
                B_E=4, B_D=4.0, N_D=3, B_m=2, microbatches=2, adjust={}, predicted={},
                search={}, profile_meta={})


def _files(model: Path, tmp: Path, kind: str) -> tuple[Plan, Plan, CoordinatorConfig]:
    """The launch plan, the other one, and the adapting coordinator's config (serving the
    launch plan: a 2-stage RRA pipeline, or a staged WAA-C mesh of 3 stage workers)."""
    from common.models.registry import config_from_hf, read_hf_config
    from coordinator.planner.analytic import analytic_profile

    cfg = config_from_hf(read_hf_config(model))
    analytic_profile("a40", cfg, "float16", tp_sizes=(1, 2)).save(tmp / "profile.json")
    waa = kind == "waa"
    launch, other = (_plan(cfg.to_dict(), split, "waa-c" if waa else "rra")
                     for split in PLANS[kind])
    (tmp / "plan.json").write_text(launch.to_json())
    (tmp / "model.json").write_text(json.dumps(cfg.to_dict()))
    place = (dict(policy="waa", waa_encoder_layers="0:4", waa_decoder_layers="0:1,1:3")
             if waa else dict(policy="rra", pipeline_stages=2, stage_layers="0:2,2:3",
                              stage_encoder_layers="0:2,2:4", n_d=3))
    co_cfg = CoordinatorConfig(
        f"ipc://{tmp}/client", f"ipc://{tmp}/workers", max_encode_batch=4, streams=2,
        heartbeat_interval_s=0.25, model_config=str(tmp / "model.json"),
        plan=str(tmp / "plan.json"), profile=str(tmp / "profile.json"), adapt=True,
        adapt_options=OPTIONS, **place)  # type: ignore[arg-type]
    return launch, other, co_cfg


def _workers(model: Path, tmp: Path, endpoint: str, num: int) -> list[subprocess.Popen[bytes]]:
    env = {**os.environ, "EXEGPT_RUNS_DIR": str(tmp / "runs"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    return [subprocess.Popen([sys.executable, "-m", "decoder_worker", "--role", "pipeline",
                              "--stage", str(i), "--worker-id", f"stage{i}", "--coordinator",
                              endpoint, "--model", str(model), "--dtype", "float32",
                              "--capacity", "16", "--kv-bind", f"ipc://{tmp}/kv{i}",
                              "--heartbeat-interval", "0.25", "--heartbeat-timeout", "10"],
                             env=env, cwd=ROOT)
            for i in range(num)]


def _there_and_back(tmp_path: Path, kind: str) -> tuple[Log, list[dict[str, Any]]]:
    """Serve the launch plan, switch to the other plan with requests in flight, serve on it,
    switch back; every request answered once with transformers' greedy tokens, no replayed
    token differing from the one the client has. Returns the log and the two switches."""
    from coordinator.server import Coordinator

    model = make_t5_43(tmp_path / "t5")
    launch, other, cfg = _files(model, tmp_path, kind)
    log = Log()
    work = [(f"r{i}", prompt, n) for i, (prompt, n) in
            enumerate(workload(VOCAB, 30, seed=11))]
    results: dict[str, list[int]] = {}
    procs: list[subprocess.Popen[bytes]] = []

    async def scenario() -> tuple[list[dict[str, Any]], int]:
        co = Coordinator(cfg, log)
        runner = asyncio.create_task(co.run())
        procs.extend(_workers(model, tmp_path, cfg.worker_endpoint, launch.num_workers))
        try:
            await wait_serving(co, runner)
            async with AsyncClient(cfg.client_endpoint) as client:
                sending = asyncio.create_task(send_work(client, work, results, concurrency=6))
                while len(results) < 4:
                    await asyncio.sleep(0.02)
                switches = [await switch_now(co, other, "test: T5 ranges", 0.02)]
                n = len(results)
                while len(results) < min(len(work), n + 6):  # served by the new layout
                    await asyncio.sleep(0.02)
                switches.append(await switch_now(co, launch, "test: T5 ranges", 0.02))
                await asyncio.wait_for(sending, 120)
            return switches, co.counters.get("replay_mismatch", 0)
        finally:
            co.request_stop()
            await asyncio.wait_for(runner, 30)

    try:
        switches, mismatches = asyncio.run(scenario())
    finally:
        reap(procs)
    expected = hf_greedy(model, [(prompt, n) for _, prompt, n in work])
    assert_exactly_once(results, work, expected)
    assert mismatches == 0
    assert sum(s["relayout"]["migrated_requests"] for s in switches) > 0
    print(json.dumps({"costs": [s["relayout"] for s in switches],
                      "switch_s": [s["switch_s"] for s in switches]}))
    return log, switches


def test_t5_stage_ranges_change_live_with_requests_in_flight(tmp_path: Path) -> None:
    log, (there, back) = _there_and_back(tmp_path, "pipeline")
    assert [s["new_layout"] for s in log.of("plan_switch")] == [
        [{"role": "pipeline", "tp_size": 1, "layer_range": list(dec)} for _, dec, _ in split]
        for split in (OTHER, LAUNCH)]
    assert [there["relayout"]["encoder_stages"], back["relayout"]["encoder_stages"]] == [
        [list(enc) for _, _, enc in split] for split in (OTHER, LAUNCH)]


@pytest.mark.slow
def test_staged_t5_waa_split_changes_live_with_requests_in_flight(tmp_path: Path) -> None:
    """1 encoder stage + 2 decoder stages -> 2 + 1 and back: the last encoder stage (another
    worker each time) hands every decoder stage the cross K/V of its layers."""
    _, (there, back) = _there_and_back(tmp_path, "waa")
    assert [there["relayout"]["stages"], back["relayout"]["stages"]] == [
        {"encoder": [[0, 2], [2, 4]], "decoder": [[0, 3]]},
        {"encoder": [[0, 4]], "decoder": [[0, 1], [1, 3]]}]


@pytest.mark.slow
def test_t5_stages_regroup_into_one_tp2_stage_and_back(tmp_path: Path) -> None:
    """2 x tp-1 T5 stages -> one tp-2 stage holding both whole stacks (a gloo group formed
    live, each rank's shard of both stacks from host memory) -> the launch split again."""
    _, (there, back) = _there_and_back(tmp_path, "tp")
    assert [there["relayout"]["tp_sizes"], back["relayout"]["tp_sizes"]] == [[2], [1, 1]]
    assert [there["relayout"]["encoder_stages"], back["relayout"]["encoder_stages"]] == [
        [[0, 4]], [[0, 2], [2, 4]]]
