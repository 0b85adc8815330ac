"""A live change of a WAA mesh's encoder/decoder split: real processes, a real tiny model.

Four whole-model workers (tp 1) serve a 4-layer tiny llama with a WAA plan whose split is not
the one its policy's rule would pick: WAA-C served 1 encoder + 3 decoders (the rule wants 2 +
2), WAA-M served 2 + 2 (it wants 1 + 3). The traffic shifts from short to long requests; the
detector fires, the re-plan's split differs from the served one, and the coordinator switches
one worker's role while serving (coordinator.adapt_roles):

- decoder -> encoder (WAA-C): drain timeout 0 s, so every request the decoder holds is
  migrated (re-run from prompt + streamed tokens under a new wire id): the re-run path;
- encoder -> decoder (WAA-M, slow): the encoder finishes its batches, then becomes a decoder;
- T5 decoder -> encoder (slow): the two roles build different weights from the host copy.

Every request must be answered exactly once with transformers' greedy tokens; the switch's
cost (drain, reload from host memory, time out of service) is printed.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from common.client import AsyncClient
from coordinator.adapt_roles import served_plan
from coordinator.launch import LocalMesh
from coordinator.planner.analytic import analytic_profile
from coordinator.planner.plan import Plan
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
from tests.runner.tinymodels import make_llama, make_t5

STATIONARY = 24  # short requests first: no switch allowed
SHIFT_LIMIT = 160  # long requests sent at most while waiting for the switch
AFTER = 16  # long requests sent after the switch: served by the new split
BOUND_S = 10.0  # as in test_adapt_relayout: a bound the CPU mesh meets with margin


def _served_plan(model: Path, tmp: Path, policy: str,
                 counts: tuple[int, int]) -> tuple[Plan, Path, Path]:
    """A ``policy`` plan for SHORT, served as ``counts`` whole-model encoders/decoders."""
    from common.models.registry import config_from_hf, read_hf_config

    cfg = config_from_hf(read_hf_config(model))
    profile = analytic_profile("a40", cfg, "float16", tp_sizes=(1,))
    prof_path = tmp / "profile.json"
    profile.save(prof_path)
    plan = served_plan(make_plan(parse_workload(SHORT), profile, 4, BOUND_S, policy=policy),
                       counts, cfg)
    plan_path = tmp / "plan.json"
    plan_path.write_text(plan.to_json())
    return plan, plan_path, prof_path


def _run(tmp_path: Path, policy: str, counts: tuple[int, int], want: tuple[int, int],
         t5: bool = False) -> None:
    from tests.runner.tinymodels import hf_greedy

    model = make_t5(tmp_path / "t5") if t5 else make_llama(tmp_path / "llama4", num_layers=4,
                                                            seed=5)
    plan, plan_path, prof_path = _served_plan(model, tmp_path, policy, counts)
    spec = adapt_spec(plan, plan_path, prof_path, model, tmp_path, 64)
    short, long = draw_work(SHORT, STATIONARY, 1, "s"), draw_work(LONG, SHIFT_LIMIT + AFTER, 2, "l")
    if t5:  # its vocabulary is 96 (prompt ids avoid the special ids 0..3)
        short, long = ([(r, [4 + t % 92 for t in p], n) for r, p, n in w] for w in (short, long))
    results: dict[str, list[int]] = {}

    async def scenario() -> tuple[dict, dict, int]:
        async with AsyncClient(mesh.client_endpoint) as client:
            await send_work(client, short, results)
            assert (await adapt_stats(client))["switches"] == []  # stationary: no switch
            stop = asyncio.Event()
            watcher = asyncio.create_task(watch_switch(client, stop))
            sent = await send_work(client, long[:SHIFT_LIMIT], results, stop)
            stop.set()
            await watcher
            adapt = await adapt_stats(client)
            assert adapt["switches"], f"no switch after {sent} long requests: {adapt}"
            sent += await send_work(client, long[sent:sent + AFTER], results)
            return adapt, (await client.stats()).stats, sent

    with LocalMesh(spec, startup_timeout_s=120) as mesh:
        adapt, stats, sent = asyncio.run(scenario())
        assert mesh.stop(grace_s=30) == []
    switch = adapt["switches"][0]
    roles = switch["relayout"]
    print(json.dumps(switch, default=str))
    assert roles["kind"] == "role_switch" and roles["counts"] == list(want), roles
    assert adapt["role_switch"] is None  # finished
    live = [(w["role"], w["state"]) for w in stats["workers"]]
    assert sorted(live) == sorted([("encoder", "ready")] * want[0]
                                  + [("decoder", "ready")] * want[1]), live
    for key in ("reload_s", "switch_total_s", "rerun_tokens", "migrated_requests"):
        assert roles[key] >= 0, key
    assert max(roles["worker_out_s"].values()) >= roles["reload_s"]
    # every request exactly once (a duplicate fails in _send), with transformers' tokens
    work = short + long[:sent]
    assert sorted(results) == sorted(r for r, _, _ in work)
    expected = hf_greedy(model, [(p, n) for _, p, n in work])
    wrong = [r for (r, _, _), w in zip(work, expected, strict=True) if results[r] != w]
    assert not wrong, f"{len(wrong)} requests differ from transformers, e.g. {wrong[:5]}"
    assert stats["requests"]["completed"] == len(work) and stats["requests"]["failed"] == 0


def test_decoder_becomes_encoder_live_with_migration(tmp_path: Path) -> None:
    _run(tmp_path, "waa-c", (1, 3), (2, 2))


@pytest.mark.slow
def test_encoder_becomes_decoder_live(tmp_path: Path) -> None:
    _run(tmp_path, "waa-m", (2, 2), (1, 3))


@pytest.mark.slow
def test_t5_decoder_becomes_encoder_live(tmp_path: Path) -> None:
    """T5's roles hold different weights (the decoder role skips the encoder stack)."""
    _run(tmp_path, "waa-c", (1, 3), (2, 2), t5=True)
