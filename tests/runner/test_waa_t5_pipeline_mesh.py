"""Staged WAA for T5 through the real mesh (coordinator/waa_layout.py): 2 encoder stages split
the encoder stack, 2 decoder stages the decoder stack; the last encoder stage hands each
decoder stage the cross K/V of its layers, the decoder pipeline samples every token (the first
from the start token) in B_m = 2 micro-batches. The plan file goes through `exegpt serve`'s
path (plan_launch); greedy outputs token-identical to transformers under concurrent,
mixed-length requests."""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from common import protocol as P
from common.client import AsyncClient
from coordinator.commands.serve import model_fields
from coordinator.launch import LaunchSpec, LocalMesh
from tests.runner.test_t5_stages import VOCAB, make_t5_43
from tests.runner.tinymodels import hf_greedy, workload

torch.set_num_threads(1)
ENCODERS = ((0, 1), (1, 4))  # of T5's 4 encoder layers
DECODERS = ((0, 2), (2, 3))  # of its 3 decoder layers


@pytest.fixture(scope="module")
def t5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_t5_43(tmp_path_factory.mktemp("models") / "t5")


def staged_plan(t5: Path, tp: tuple[int, int, int, int] = (1, 1, 1, 1), **kw: Any) -> Any:
    """A staged waa-c plan as the planner writes it for T5: encoder groups hold encoder layers
    (``encoder_layer_range``, decoder layers (0, 0)), decoder groups decoder layers."""
    from coordinator.planner.plan import Plan
    from coordinator.planner.plan import WorkerGroup as PlanGroup

    enc = (PlanGroup("encoder", t, t, (0, 0), r) for r, t in zip(ENCODERS, tp[:2], strict=True))
    dec = (PlanGroup("decoder", t, t, r, (0, 0)) for r, t in zip(DECODERS, tp[2:], strict=True))
    groups = (*enc, *dec)
    return Plan(**{"policy": "waa-c", "model": model_fields(str(t5))["model_config"],
                   "workload": "t", "latency_bound_s": 10.0, "sla": "b", "num_workers": sum(tp),
                   "worker_groups": groups, "B_E": 3, "B_D": 6.0, "N_D": None, "B_m": 2,
                   "microbatches": 2, "adjust": {"token_sum": [1.0, 12.0]}, "predicted": {},
                   "search": {}, "profile_meta": {}, **kw})


def serve_spec(plan: Any, t5: Path, tmp: Path) -> LaunchSpec:
    """What `exegpt serve --model T5 --plan plan.json` launches."""
    from coordinator.commands import serve

    (tmp / "plan.json").write_text(plan.to_json())
    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model", str(t5), "--plan", str(tmp / "plan.json"),
                              "--dtype", "float32", "--runs-dir", str(tmp / "runs")])
    return serve.spec_from_args(args)


async def _settled(client: AsyncClient) -> dict:
    """Stats once every stage holds nothing and every KV byte sent arrived (heartbeats lag)."""
    deadline = time.monotonic() + 10
    while True:
        stats = (await client.stats()).stats
        loads = [w["load"] for w in stats["workers"]]
        sent = sum(x.get("kv_bytes_sent", 0) for x in loads)
        got = sum(x.get("kv_bytes_received", 0) for x in loads)
        idle = all(x.get("active", 0) == 0 for x in loads)
        if (idle and sent == got > 0) or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.2)


def test_staged_t5_waa_plan_matches_transformers(t5: Path, tmp_path: Path) -> None:
    _check_greedy(t5, tmp_path, (1, 1, 1, 1))


@pytest.mark.slow  # TP ranks start slowly on a loaded machine
def test_staged_t5_waa_with_tp_2_stages_matches_transformers(t5: Path, tmp_path: Path) -> None:
    """Encoder stage 1 (the cross K/V writer) and decoder stage 0 are TP groups of 2: the
    cross K/V are gathered by heads, then re-sharded by heads on the decoder side."""
    _check_greedy(t5, tmp_path, (1, 2, 2, 1))


def _check_greedy(t5: Path, tmp_path: Path, tp: tuple[int, int, int, int]) -> None:
    spec = serve_spec(staged_plan(t5, tp), t5, tmp_path)
    assert spec.waa_staged and spec.streams == 2
    assert [g.tp_size for g in spec.groups] == list(tp)
    assert [(g.role, g.layer_range) for g in spec.groups] == [
        *(("encoder", r) for r in ENCODERS), *(("decoder", r) for r in DECODERS)]
    work = workload(VOCAB, 12, seed=3) + [([9, 10, 11], 1)]  # one ends at its first token
    expected = hf_greedy(t5, work)
    assert max(len(set(row)) for row in expected) > 4  # the reference is not degenerate

    async def go(endpoint: str) -> tuple[list[P.Result], dict]:
        async with AsyncClient(endpoint) as client:
            results = await asyncio.gather(*(
                client.generate(prompt_ids=p, max_new_tokens=n, timeout_s=120)
                for p, n in work))
            return list(results), await _settled(client)

    with LocalMesh(spec, startup_timeout_s=120) as mesh:
        results, stats = asyncio.run(go(mesh.client_endpoint))
        assert mesh.stop(grace_s=30) == []
    assert [list(r.tokens) for r in results] == expected
    for r in results:  # every token, the first too, comes from the decoder pipeline
        life = r.lifecycle
        assert life.t_encode_start <= life.t_encode_end <= life.t_first_token <= life.t_finish
        assert life.t_kv_sent is not None and life.t_kv_received is not None
        assert life.t_kv_sent <= life.t_first_token and len(life.t_tokens) == len(r.tokens)
    pipe = stats["pipeline"]
    assert pipe["encoder_stages"] == [list(r) for r in ENCODERS]
    assert pipe["decoder_stages"] == [list(r) for r in DECODERS]
    assert pipe["B_m"] == 2 and pipe["failed_passes"] == 0
    assert stats["requests"]["be_adjustments"] > 0  # dynamic B_E on the encoder pipeline
    assert {"stream0", "stream1"} <= set(stats["per_worker"])  # both micro-batches decoded
    loads = {w["worker_id"].split(".")[0]: w["load"] for w in stats["workers"]
             if "active" in w["load"]}  # each stage's rank 0 (followers report no load)
    assert all(x["active"] == 0 for x in loads.values()), loads  # nothing stranded
    # only the last encoder stage hands KV on (cross K/V), to both decoder stages
    assert loads["enc0"].get("kv_bytes_sent", 0) == 0 < loads["enc1"]["kv_bytes_sent"]
    assert loads["enc1"]["kv_bytes_sent"] == sum(loads[f"dec{k}"]["kv_bytes_received"]
                                                 for k in (0, 1))


def test_bad_staged_t5_plans_are_refused_with_the_reason(t5: Path) -> None:
    from coordinator.commands.up import runnable_problem
    from coordinator.planner.plan import WorkerGroup as PlanGroup

    assert runnable_problem(staged_plan(t5), null_model=False) is None
    assert runnable_problem(staged_plan(t5, (1, 2, 2, 1)), null_model=False) is None
    good = staged_plan(t5).worker_groups
    mixed = (good[0], PlanGroup("encoder", 1, 1, (0, 1), (1, 4)), *good[2:])
    assert "encoder layers only" in (runnable_problem(
        staged_plan(t5, worker_groups=mixed), null_model=False) or "")
    short = (*good[:3], PlanGroup("decoder", 1, 1, (2, 2), (0, 0)))
    assert "contiguous" in (runnable_problem(
        staged_plan(t5, worker_groups=short), null_model=False) or "")
    gap = (good[0], PlanGroup("encoder", 1, 1, (0, 0), (1, 3)), *good[2:])
    assert "cover layers 0..3 of 4" in (runnable_problem(
        staged_plan(t5, worker_groups=gap), null_model=False) or "")


def test_t5_layout_routes_only_the_last_encoder_stage() -> None:
    from common.models.config import ModelConfig
    from coordinator.config import CoordinatorConfig
    from coordinator.waa_layout import waa_layout

    model = ModelConfig.preset("tiny-t5")
    enc, dec = model.num_encoder_layers, model.num_layers
    cfg = CoordinatorConfig("ipc:///tmp/c", "ipc:///tmp/w", waa_encoder_layers=f"0:1,1:{enc}",
                            waa_decoder_layers=f"0:1,1:{dec}")
    layout = waa_layout(cfg, model)
    assert layout.cross and layout.start_token == (model.pad_token_id or 0)
    assert layout.routes(0) == [] and layout.routes(1) == [(0, (0, 1)), (1, (1, dec))]
    wrong = CoordinatorConfig("ipc:///tmp/c", "ipc:///tmp/w", waa_encoder_layers=f"0:{enc + 1}",
                              waa_decoder_layers=f"0:{dec}")
    with pytest.raises(ValueError, match=f"the model has {enc}"):
        waa_layout(wrong, model)
