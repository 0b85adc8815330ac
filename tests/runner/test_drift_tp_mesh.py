"""A drift-driven tp_size switch end to end, then a coordinator restart that keeps it.

Real processes (coordinator, two stage workers of a 4-layer tiny llama), the real detector,
the real background re-plan and the real live re-group. The served plan runs two tp-1 stages;
the adapter re-plans with a profile whose tp-1 rows are 20x slower than the analytic A40's (a
planner seam: with it the planner puts the whole model on one tp-2 stage for any workload, so
the re-plan of the fire is a tp change, deterministically). The traffic shifts from short to
long; the detector fires, the re-plan's plan is 1 x tp-2, the workers form a gloo group live
(coordinator.relayout_tp). The switch commits the layout to ``plan.layout.json`` beside the plan
(coordinator.layout_state); the coordinator is then killed (-9) and started again with its
launch flags and the original --plan: it resumes the tp-2 layout from the state, the same
worker processes rejoin (their placement check passes) and serve. Every request, before and
after the restart, must be answered once with transformers' greedy tokens; a clean stop
removes the state. The same scenario on the null model covers the null backend's TP re-group
(no gloo group, but the rendezvous and the two-step re-Assign). Both slow: ~20-70 s, mostly
process start-ups; the fast checks of the state file are tests/runner/test_layout_state.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from common.client import AsyncClient
from common.models.config import ModelConfig
from coordinator.launch import LaunchSpec, LocalMesh
from coordinator.planner.plan import Plan, WorkerGroup
from tests.mesh.meshctl import log_events, restart_coordinator
from tests.runner.adaptmesh import (
    LONG,
    OPTIONS,
    SHORT,
    adapt_spec,
    adapt_stats,
    draw_work,
    send_work,
    watch_switch,
)
from tests.runner.tinymodels import hf_greedy, make_llama

STATIONARY = 32  # short requests: no switch allowed
SHIFT_LIMIT = 160  # long requests sent at most while waiting for the switch
DETECT_BOUND = 100  # long requests before the fire (the re-layout test's bound, docs)
AFTER = 12  # long requests after the restart
TP1_SLOWDOWN = 20.0  # the planner seam: tp-1 compute rows x this
NULL_DECODE_MS = 4.0  # the null model's decode pass (so requests overlap the switch)


def tp_favouring_profile(cfg: ModelConfig, tmp: Path) -> tuple[Path, Any]:
    """The analytic A40 profile of the model at tp 1 and 2, its tp-1 compute 20x slower."""
    from coordinator.planner.analytic import analytic_profile

    profile = analytic_profile("a40", cfg, "float16", tp_sizes=(1, 2))
    rows = [dict(r, time_s=r["time_s"] * TP1_SLOWDOWN)
            if r["tp"] == 1 and r["op"] not in ("stage_send", "kv_handoff") else r
            for r in profile.rows]
    fake = dataclasses.replace(profile, rows=rows)
    path = tmp / "profile.json"
    fake.save(path)
    return path, fake


def served_plan(cfg: ModelConfig, tmp: Path) -> tuple[Path, Path, Plan]:
    """The plan file: two tp-1 stages (not what this profile's planner makes: tp-2)."""
    from coordinator.planner.planning import make_plan
    from coordinator.planner.workload import parse_workload

    prof_path, profile = tp_favouring_profile(cfg, tmp)
    plan = make_plan(parse_workload(SHORT), profile, 2, 10.0, policy="rra")
    assert [(g.tp_size, g.count) for g in plan.worker_groups] == [(2, 2)]  # the seam works
    half = cfg.num_layers // 2
    plan = dataclasses.replace(plan, worker_groups=(
        WorkerGroup("pipeline", 1, 1, (0, half)),
        WorkerGroup("pipeline", 1, 1, (half, cfg.num_layers))), microbatches=2)
    plan_path = tmp / "plan.json"
    plan_path.write_text(plan.to_json())
    return plan_path, prof_path, plan


def null_spec(tmp: Path) -> tuple[LaunchSpec, ModelConfig]:
    """The same scenario on the null model (common.backend): no weights, no gloo group."""
    from coordinator.plan_launch import plan_fields

    cfg = ModelConfig.preset("tiny-llama")
    plan_path, prof_path, plan = served_plan(cfg, tmp)
    return LaunchSpec(**plan_fields(plan, null_model=True, decoder_capacity=256),
                      runs_path=tmp / "runs", transport="ipc", model_shape=cfg.name,
                      decode_cost_ms=NULL_DECODE_MS, heartbeat_interval_s=0.25,
                      coordinator_args=("--plan", str(plan_path), "--profile", str(prof_path),
                                        "--adapt", "--adapt-options", OPTIONS)), cfg


def shift_then_restart(spec: LaunchSpec, tmp: Path) -> tuple[dict[str, Any], list[Any]]:
    """Serve short then long requests until the switch; kill -9 the coordinator, start it
    again, serve more long requests. Returns what was seen and the work sent."""
    state_path = tmp / "plan.layout.json"
    short = draw_work(SHORT, STATIONARY, 1, "s")
    long = draw_work(LONG, SHIFT_LIMIT + AFTER, 2, "l")
    seen: dict[str, Any] = {"results": {}}
    results = seen["results"]

    async def before(mesh: LocalMesh) -> int:
        async with AsyncClient(mesh.client_endpoint) as client:
            await send_work(client, short, results)
            assert (await adapt_stats(client))["switches"] == []  # stationary: no switch
            stop = asyncio.Event()
            watcher = asyncio.create_task(watch_switch(client, stop))
            sent = await send_work(client, long[:SHIFT_LIMIT], results, stop)
            stop.set()
            await watcher
            for _ in range(100):  # the switch is reported once the new layout is live
                stats = (await client.stats()).stats
                if stats["pipeline"]["relayout"] is None:
                    break
                await asyncio.sleep(0.1)
            seen["adapt"], seen["before"] = stats["adapt"], stats
            return sent

    async def after(mesh: LocalMesh, sent: int) -> None:
        async with AsyncClient(mesh.client_endpoint) as client:
            seen["restarted"] = (await client.stats()).stats
            await send_work(client, long[sent:sent + AFTER], results)
            seen["after"] = (await client.stats()).stats

    with LocalMesh(spec, startup_timeout_s=120) as mesh:
        sent = asyncio.run(before(mesh))
        switches = seen["adapt"]["switches"]
        assert switches, f"no switch after {sent} long requests: {seen['adapt']}"
        assert switches[0]["detect_arrival"] - STATIONARY <= DETECT_BOUND, switches[0]
        assert switches[0]["relayout"]["tp_sizes"] == [2], switches[0]
        state = json.loads(state_path.read_text())
        assert state["epoch"] == 1 and state["stages"] == seen["before"]["pipeline"]["stages"]
        assert sorted((p["tp_rank"], p["tp_size"]) for p in state["workers"].values()) == [
            (0, 2), (1, 2)]
        pids = [c.pid for c in mesh.workers]
        seen["restart_s"] = restart_coordinator(mesh, timeout_s=90.0)
        asyncio.run(after(mesh, sent))
        assert [c.pid for c in mesh.workers] == pids and all(c.poll() is None
                                                           for c in mesh.workers)
        resumed = log_events(mesh.spec.run_dir, "coordinator", "layout_state_resumed")
        rejoined = log_events(mesh.spec.run_dir, "", "rejoined")
        assert mesh.stop(grace_s=30) == []
    restarted = seen["restarted"]
    assert restarted["instance"] != seen["before"]["instance"]
    assert restarted["pipeline"]["stages"] == seen["before"]["pipeline"]["stages"]
    assert sorted((w["tp_rank"], w["tp_size"]) for w in restarted["workers"]) == [(0, 2),
                                                                                  (1, 2)]
    assert restarted["adapt"]["knobs"] == seen["adapt"]["knobs"]  # the adopted plan's
    assert len(resumed) == 1 and len(rejoined) >= 2, (resumed, rejoined)
    assert not state_path.exists()  # the clean stop shut the workers down: state cleared
    work = short + long[:sent + AFTER]
    assert sorted(results) == sorted(r for r, _, _ in work)
    assert seen["after"]["requests"]["failed"] == 0
    print(json.dumps({"switch": switches[0], "restart_to_serving_s":
                      round(seen["restart_s"], 2)}, default=str))
    return seen, work


@pytest.mark.slow  # ~20-25 s here, mostly worker process start-ups (x2: the restart)
def test_null_model_drift_regroups_to_tp2_and_a_restarted_coordinator_keeps_it(
        tmp_path: Path) -> None:
    """The null backend's TP re-group (no gloo group: rank 0 still binds the rendezvous and
    the coordinator's two-step re-Assign runs) and the restart, in the default run."""
    from common.backend import null_tokens

    spec, cfg = null_spec(tmp_path)
    seen, work = shift_then_restart(spec, tmp_path)
    assert seen["before"]["pipeline"]["stages"] == [[0, cfg.num_layers]]
    wrong = [r for r, prompt, n in work
             if seen["results"][r] != null_tokens(prompt, n, cfg.vocab_size)]
    assert not wrong, f"{len(wrong)} requests got other tokens, e.g. {wrong[:5]}"


@pytest.mark.slow
def test_drift_regroups_to_tp2_live_and_a_restarted_coordinator_keeps_it(
        tmp_path: Path) -> None:
    """A real 4-layer tiny llama: a real gloo group formed live, token-exact vs transformers."""
    from common.models.registry import config_from_hf, read_hf_config

    model = make_llama(tmp_path / "llama4", num_layers=4, seed=5)
    plan_path, prof_path, plan = served_plan(config_from_hf(read_hf_config(model)), tmp_path)
    spec = adapt_spec(plan, plan_path, prof_path, model, tmp_path, 256)
    seen, work = shift_then_restart(spec, tmp_path)
    assert seen["before"]["pipeline"]["stages"] == [[0, 4]]
    expected = hf_greedy(model, [(p, n) for _, p, n in work])
    wrong = [r for (r, _, _), want in zip(work, expected, strict=True)
             if seen["results"][r] != want]
    assert not wrong, f"{len(wrong)} requests differ from transformers, e.g. {wrong[:5]}"
