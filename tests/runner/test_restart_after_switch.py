"""A WAA role switch, then the coordinator is killed (-9) and started again with its launch flags.

Real processes: four whole-model workers of a 4-layer tiny llama serving WAA-C as 1 encoder +
3 decoders (the rule wants 2 + 2); short then long traffic; the real detector fires and one
decoder becomes an encoder live (coordinator.adapt_roles). The switch writes the served plan
(its split, its knobs) and every worker's role and capacity to ``plan.layout.json``
(coordinator.layout_state). The coordinator is then killed and started again with the same
flags and the original --plan:

- with the state: it serves the switched plan (2 + 2, the new knobs, the same epoch count),
  the same four worker processes rejoin in their current roles and serve;
- without it (``EXEGPT_LAYOUT_STATE=off``, slow): what happened before the state covered role
  switches. The workers still rejoin (a worker's Hello names the role it built, so its
  placement check passes; none stops), but the coordinator serves the launch plan's knobs and
  its adapter believes in the launch split (1 + 3) while the mesh runs 2 + 2.

Every request before and after the restart is answered exactly once with transformers' greedy
tokens.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from common.client import AsyncClient
from coordinator.launch import LocalMesh
from tests.mesh.meshctl import log_events, restart_coordinator
from tests.runner.adaptmesh import (
    LONG,
    SHORT,
    adapt_spec,
    adapt_stats,
    draw_work,
    send_work,
    watch_switch,
)
from tests.runner.test_adapt_roles import _served_plan
from tests.runner.tinymodels import hf_greedy, make_llama

STATIONARY = 24  # short requests first: no switch allowed
SHIFT_LIMIT = 160  # long requests sent at most while waiting for the switch
AFTER = 16  # long requests after the restart


def _roles(stats: dict[str, Any]) -> list[str]:
    return sorted(w["role"] for w in stats["workers"] if w["state"] == "ready")


def _switch_then_restart(tmp_path: Path) -> tuple[dict[str, Any], Any, list[Any], Path]:
    model = make_llama(tmp_path / "llama4", num_layers=4, seed=5)
    plan, plan_path, prof_path = _served_plan(model, tmp_path, "waa-c", (1, 3))
    spec = adapt_spec(plan, plan_path, prof_path, model, tmp_path, 64)
    short, long = draw_work(SHORT, STATIONARY, 1, "s"), draw_work(LONG, SHIFT_LIMIT + AFTER, 2, "l")
    seen: dict[str, Any] = {"results": {}, "launch_knobs": None}
    results = seen["results"]

    async def before(mesh: LocalMesh) -> int:
        async with AsyncClient(mesh.client_endpoint) as client:
            await send_work(client, short, results)
            adapt = await adapt_stats(client)
            assert adapt["switches"] == []  # stationary: no switch
            seen["launch_knobs"] = adapt["knobs"]
            stop = asyncio.Event()
            watcher = asyncio.create_task(watch_switch(client, stop))
            sent = await send_work(client, long[:SHIFT_LIMIT], results, stop)
            stop.set()
            await watcher
            seen["before"] = (await client.stats()).stats
            return sent

    async def after(mesh: LocalMesh, sent: int) -> None:
        async with AsyncClient(mesh.client_endpoint) as client:
            seen["restarted"] = (await client.stats()).stats
            await send_work(client, long[sent:sent + AFTER], results)
            seen["after"] = (await client.stats()).stats

    with LocalMesh(spec, startup_timeout_s=120) as mesh:
        sent = asyncio.run(before(mesh))
        switches = seen["before"]["adapt"]["switches"]
        assert switches, f"no switch after {sent} long requests"
        assert switches[0]["relayout"]["kind"] == "role_switch", switches[0]
        assert _roles(seen["before"]) == ["decoder"] * 2 + ["encoder"] * 2
        pids = [c.pid for c in mesh.workers]
        seen["state"] = json.loads(p.read_text()) if (p := tmp_path / "plan.layout.json"
                                                       ).exists() else None
        seen["restart_s"] = restart_coordinator(mesh, timeout_s=90.0)
        asyncio.run(after(mesh, sent))
        assert [c.pid for c in mesh.workers] == pids and all(c.poll() is None
                                                           for c in mesh.workers)
        seen["resumed"] = log_events(mesh.spec.run_dir, "coordinator", "layout_state_resumed")
        seen["rejoined"] = log_events(mesh.spec.run_dir, "", "rejoined")
        assert mesh.stop(grace_s=30) == []
    work = short + long[:sent + AFTER]
    assert sorted(results) == sorted(r for r, _, _ in work)  # each once (send_work checks)
    expected = hf_greedy(model, [(p, n) for _, p, n in work])
    wrong = [r for (r, _, _), want in zip(work, expected, strict=True) if results[r] != want]
    assert not wrong, f"{len(wrong)} requests differ from transformers, e.g. {wrong[:5]}"
    restarted, after_stats = seen["restarted"], seen["after"]
    assert restarted["instance"] != seen["before"]["instance"]
    assert _roles(restarted) == ["decoder"] * 2 + ["encoder"] * 2  # nobody stopped
    assert after_stats["requests"]["failed"] == 0 and len(seen["rejoined"]) >= 4
    print(json.dumps({"switch": switches[0], "restart_to_serving_s":
                      round(seen["restart_s"], 2)}, default=str))
    return seen, plan, work, tmp_path / "plan.layout.json"


@pytest.mark.slow  # ~50 s here: two coordinator and four worker start-ups, transformers
def test_a_role_switch_survives_a_coordinator_restart(tmp_path: Path) -> None:
    seen, plan, _, state_path = _switch_then_restart(tmp_path)
    state = seen["state"]
    assert state is not None and state["stages"] is None and state["epoch"] == 1
    assert sorted(p["role"] for p in state["workers"].values()) == ["decoder"] * 2 + [
        "encoder"] * 2
    assert len(seen["resumed"]) == 1, seen["resumed"]
    switched_knobs = seen["before"]["adapt"]["knobs"]
    assert seen["restarted"]["adapt"]["knobs"] == switched_knobs  # the switched plan's
    restarted = seen["restarted"]["adapt"]  # the detector's reference: the served law
    assert restarted["workload_spec"] == state["plan"]["workload"] != plan.workload
    assert restarted["live"]["B_E"] == state["plan"]["B_E"] == switched_knobs["B_E"]
    assert not state_path.exists()  # the clean stop shut the workers down: state cleared


@pytest.mark.slow
def test_without_the_state_the_workers_stay_but_the_launch_plan_is_served(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXEGPT_LAYOUT_STATE", "off")
    seen, plan, _, _ = _switch_then_restart(tmp_path)
    assert seen["state"] is None and seen["resumed"] == []
    assert seen["restarted"]["adapt"]["knobs"] == seen["launch_knobs"]
    assert seen["restarted"]["adapt"]["workload_spec"] == plan.workload != \
        seen["before"]["adapt"]["workload_spec"]  # the launch law, not the one switched to
