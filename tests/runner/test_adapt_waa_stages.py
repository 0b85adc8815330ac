"""A live re-layout of a STAGED WAA mesh: real processes, a real tiny model, traffic that shifts.

Four tp-1 stage workers serve a 4-layer tiny llama as a staged WAA-C plan whose split is not
the one the policy's rule picks: 1 encoder stage (layers 0-4) + 3 decoder stages (0-2, 2-3,
3-4); the WAA-C rule wants 2 + 2 (encoder stages 0-2, 2-4; decoder stages 0-2, 2-4). The
traffic shifts from short to long requests; the detector fires, the re-plan's layout differs,
and the coordinator re-lays the stages out while serving (coordinator.relayout.WaaRelayout):
no encode starts, micro-batches drain (timeout 0 s: every running request is migrated, re-run
under a new wire id), every worker is re-Assigned its new side and range and rebuilds from
host memory, the new layout serves. Every request must be answered exactly once with
transformers' greedy tokens; the switch's cost is printed (``-s``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

from common.client import AsyncClient
from coordinator.launch import LocalMesh
from coordinator.planner.analytic import analytic_profile
from coordinator.planner.plan import Plan, WorkerGroup
from coordinator.planner.planning import make_plan
from coordinator.planner.workload import parse_workload
from tests.runner.adaptmesh import (
    LONG,
    SHORT,
    adapt_spec,
    adapt_stats,
    draw_work,
    send_work,
    watch_switch,
)
from tests.runner.tinymodels import make_llama

STATIONARY = 24  # short requests first: no switch allowed
SHIFT_LIMIT = 160  # long requests sent at most while waiting for the switch
AFTER = 16  # long requests sent after the switch: served by the new layout
BOUND_S = 10.0  # as in test_adapt_relayout: a bound the CPU mesh meets with margin
SERVED = (("encoder", (0, 4)), ("decoder", (0, 2)), ("decoder", (2, 3)), ("decoder", (3, 4)))
WANT = {"encoder": [[0, 2], [2, 4]], "decoder": [[0, 2], [2, 4]]}


def _served_plan(model: Path, tmp: Path) -> tuple[Plan, Path, Path]:
    """The WAA-C plan for SHORT, served with the stages of SERVED."""
    from common.models.registry import config_from_hf, read_hf_config

    cfg = config_from_hf(read_hf_config(model))
    profile = analytic_profile("a40", cfg, "float16", tp_sizes=(1,))
    prof_path = tmp / "profile.json"
    profile.save(prof_path)
    plan = make_plan(parse_workload(SHORT), profile, 4, BOUND_S, policy="waa-c")
    groups = [(g.role, list(g.layer_range)) for g in plan.worker_groups]
    assert groups == [(side, rng) for side, rngs in WANT.items() for rng in rngs], groups
    plan = dataclasses.replace(plan, worker_groups=tuple(
        WorkerGroup(side, 1, 1, rng) for side, rng in SERVED))
    plan_path = tmp / "plan.json"
    plan_path.write_text(plan.to_json())
    return plan, plan_path, prof_path


def test_staged_waa_split_changes_live_and_every_request_is_exact(tmp_path: Path) -> None:
    from tests.runner.tinymodels import hf_greedy

    model = make_llama(tmp_path / "llama4", num_layers=4, seed=5)
    plan, plan_path, prof_path = _served_plan(model, tmp_path)
    spec = adapt_spec(plan, plan_path, prof_path, model, tmp_path, 64)
    short, long = draw_work(SHORT, STATIONARY, 1, "s"), draw_work(LONG, SHIFT_LIMIT + AFTER, 2, "l")
    results: dict[str, list[int]] = {}

    async def scenario() -> tuple[dict, dict, dict, int]:
        async with AsyncClient(mesh.client_endpoint) as client:
            await send_work(client, short, results)
            before = (await client.stats()).stats
            assert before["adapt"]["switches"] == []  # stationary: no switch
            stop = asyncio.Event()
            watcher = asyncio.create_task(watch_switch(client, stop))
            sent = await send_work(client, long[:SHIFT_LIMIT], results, stop)
            stop.set()
            await watcher
            adapt = await adapt_stats(client)
            assert adapt["switches"], f"no switch after {sent} long requests: {adapt}"
            sent += await send_work(client, long[sent:sent + AFTER], results)
            return before, adapt, (await client.stats()).stats, sent

    with LocalMesh(spec, startup_timeout_s=120) as mesh:
        before, adapt, stats, sent = asyncio.run(scenario())
        assert mesh.stop(grace_s=30) == []
    assert before["pipeline"]["encoder_stages"] == [[0, 4]]
    switch = adapt["switches"][0]
    relayout = switch["relayout"]
    print(json.dumps(switch, default=str))
    assert relayout["stages"] == WANT and relayout["streams"] >= 1, relayout
    pipe = stats["pipeline"]
    assert (pipe["encoder_stages"], pipe["decoder_stages"]) == (WANT["encoder"],
                                                                WANT["decoder"])
    assert pipe["relayout"] is None and adapt["relayout"] is None  # finished
    # the new layout served: encode and decode passes after the switch
    assert pipe["encode_passes"] > before["pipeline"]["encode_passes"]
    for key in ("drain_s", "reload_s", "reassign_s", "pause_s", "rerun_tokens",
                "migrated_requests"):
        assert relayout[key] >= 0, key
    assert relayout["pause_s"] >= relayout["reassign_s"] >= relayout["reload_s"] > 0
    assert len(relayout["reload_s_per_worker"]) == 4
    # every request exactly once (a duplicate fails in _send), with transformers' tokens
    work = short + long[:sent]
    assert sorted(results) == sorted(r for r, _, _ in work)
    expected = hf_greedy(model, [(p, n) for _, p, n in work])
    wrong = [r for (r, _, _), w in zip(work, expected, strict=True) if results[r] != w]
    assert not wrong, f"{len(wrong)} requests differ from transformers, e.g. {wrong[:5]}"
    assert stats["requests"]["completed"] == len(work) and stats["requests"]["failed"] == 0
