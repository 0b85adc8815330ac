"""A staged WAA mesh re-groups its stages live, then the coordinator is killed (-9) and
started again: it resumes the re-grouped layout from the state file, and the same worker
processes rejoin and serve with transformers' greedy tokens.

Four real stage worker processes of a 4-layer tiny llama serve encoder stages [0, 2) + [2, 4)
and decoder stages [0, 2) + [2, 4) (all tp-1). The coordinator runs in a child process (this
file's ``__main__``) so it can be killed with SIGKILL; in its first life it starts the
adapter's own re-layout path to one tp-2 encoder stage + one tp-2 decoder stage (two gloo
groups formed live, as in test_relayout_waa_tp_mesh) when the test says so. The second child
is the same coordinator with the same config and the original --plan: it must read
``plan.layout.json`` (ranges ``0:4`` per side, B_m, tp sizes [2, 2]) so that the rejoining
workers' placement check passes. Every request before and after the restart is answered
exactly once; a clean stop (SIGTERM) clears the state.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from common.client import AsyncClient
from coordinator.config import CoordinatorConfig
from tests.runner.adaptmesh import SHORT, draw_work, send_work
from tests.runner.test_relayout_tp_mesh import ROOT
from tests.runner.test_relayout_waa_tp_mesh import TP2, _files, _plan, _workers
from tests.runner.tinymodels import hf_greedy, make_llama

BEFORE, DURING, AFTER = 12, 12, 12  # requests: before the switch, while it runs, after restart


class JsonLog:
    """The child coordinator's log: one JSON line per event on stdout (read by the test)."""

    def __getattr__(self, level: str) -> Any:
        def emit(event: str, **kw: Any) -> None:
            print(json.dumps({"event": event, **kw}, default=str), flush=True)

        return emit


async def _child(tmp: Path, mode: str) -> None:
    """Serve ``tmp/config.json``; ``switch``: re-group to TP2 once ``tmp/go`` exists."""
    import torch

    from coordinator.server import Coordinator
    from tests.runner.adaptmesh import switch_now

    torch.set_num_threads(1)
    cfg = CoordinatorConfig(**json.loads((tmp / "config.json").read_text()))
    co = Coordinator(cfg, JsonLog())
    runner = asyncio.create_task(co.run())
    if mode == "switch":
        while not (tmp / "go").exists():
            await asyncio.sleep(0.05)
        served = co.adapter.plan  # type: ignore[union-attr]
        switch = await switch_now(co, _plan(served, TP2), "test: tp change")
        (tmp / "switched.json").write_text(json.dumps(switch, default=str))
    await runner


def _start(tmp: Path, mode: str, generation: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = open(tmp / f"coordinator{generation}.jsonl", "wb")  # noqa: SIM115 - the child's
    return subprocess.Popen([sys.executable, __file__, str(tmp), mode], env=env, cwd=ROOT,
                            stdout=out, stderr=subprocess.STDOUT)


def _events(tmp: Path, generation: int, name: str) -> list[dict[str, Any]]:
    lines = (tmp / f"coordinator{generation}.jsonl").read_text().splitlines()
    return [e for e in (json.loads(x) for x in lines if x.startswith("{"))
            if e["event"] == name]


def _wait(what: str, until: Any, timeout_s: float, procs: list[Any]) -> None:
    deadline = time.monotonic() + timeout_s
    while not until():
        dead = [p.args for p in procs if p.poll() is not None]
        assert not dead and time.monotonic() < deadline, f"{what}: timed out; exited {dead}"
        time.sleep(0.1)


@pytest.mark.slow  # 26-53 s here: six process start-ups, transformers for the tokens
def test_a_staged_waa_tp_regroup_survives_a_coordinator_kill(tmp_path: Path) -> None:
    model = make_llama(tmp_path / "llama4", num_layers=4, seed=5)
    _, cfg = _files(model, tmp_path, launched_tp2=False)
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    state_path = tmp_path / "plan.layout.json"
    work = draw_work(SHORT, BEFORE + DURING + AFTER, 3, "r")
    results: dict[str, list[int]] = {}

    async def send(part: list[Any], go: bool = False) -> None:
        async with AsyncClient(cfg.client_endpoint) as client:
            sending = asyncio.create_task(send_work(client, part, results, concurrency=6))
            if go:  # the re-group starts with requests in flight (they are migrated)
                while len(results) < BEFORE + 2:
                    await asyncio.sleep(0.05)
                (tmp_path / "go").touch()
            await sending

    def serving(generation: int) -> bool:
        return bool(_events(tmp_path, generation, "serving"))

    first = _start(tmp_path, "switch", 0)
    workers = _workers(model, tmp_path, cfg.worker_endpoint, False)
    procs = [first, *workers]
    try:
        _wait("the first coordinator serving", lambda: serving(0), 120, procs)
        asyncio.run(send(work[:BEFORE]))
        asyncio.run(send(work[BEFORE:BEFORE + DURING], go=True))
        _wait("the re-group", (tmp_path / "switched.json").exists, 120, procs)
        switch = json.loads((tmp_path / "switched.json").read_text())
        state = json.loads(state_path.read_text())
        first.send_signal(signal.SIGKILL)  # no clean stop: the workers keep the tp-2 groups
        first.wait(timeout=15)
        t_kill = time.monotonic()
        second = _start(tmp_path, "serve", 1)
        procs = [second, *workers]
        _wait("the restarted coordinator serving", lambda: serving(1), 90, procs)
        restart_s = time.monotonic() - t_kill
        asyncio.run(send(work[BEFORE + DURING:]))
        assert all(w.poll() is None for w in workers)  # nobody stopped on the placement check
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=60) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for proc in workers:
            proc.wait(timeout=30)
    assert [w.returncode for w in workers] == [0, 0, 0, 0]  # told to stop by the clean stop
    assert switch["relayout"]["tp_sizes"] == {"encoder": [2], "decoder": [2]}
    assert state["stages"] == {"encoder": [[0, 4]], "decoder": [[0, 4]]} and state["tp"] == [2, 2]
    assert sorted((p["stage"], p["tp_rank"], p["tp_size"]) for p in state["workers"].values()) \
        == [(0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2)]
    resumed = _events(tmp_path, 1, "layout_state_resumed")
    assert len(resumed) == 1 and resumed[0]["stages"] == state["stages"], resumed
    assert not _events(tmp_path, 1, "worker_lost")  # every worker rejoined in its place
    assert not state_path.exists()  # the clean stop cleared it
    expected = hf_greedy(model, [(prompt, n) for _, prompt, n in work])
    assert {r: results.get(r) for r, _, _ in work} == {
        r: want for (r, _, _), want in zip(work, expected, strict=True)}
    print(json.dumps({"switch_s": switch["switch_s"], "pause_s": switch["pause_s"],
                      "migrated": switch["relayout"].get("migrated_requests"),
                      "kill_to_serving_s": round(restart_s, 2)}))


if __name__ == "__main__":
    asyncio.run(_child(Path(sys.argv[1]), sys.argv[2]))
