"""Staged WAA plans through the real mesh (coordinator/waa_pipeline.py): an encoder pipeline
and a decoder pipeline of stage worker processes whose layer splits differ, KV handed from
each encoder stage to the decoder stages holding its layers, B_m = 2 decode micro-batches;
greedy outputs token-identical to transformers under concurrent, mixed-length requests."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from common import protocol as P
from common.client import AsyncClient
from common.errors import Unavailable, WorkerLost
from coordinator.commands.serve import model_fields
from coordinator.launch import LaunchSpec, LocalMesh, WorkerGroup
from tests.runner.tinymodels import hf_greedy, workload

ENCODERS = ((0, 1), (1, 4))  # encoder stage 0 feeds decoder stage 0 only, stage 1 both
DECODERS = ((0, 3), (3, 4))


def make_llama4(directory: Path) -> Path:
    """tinymodels' llama with 4 layers (so encoder and decoder splits can differ)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      eos_token_id=3, bos_token_id=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # peaked, non-degenerate greedy output
        for p in model.parameters():
            p.mul_(4.0)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llama4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama4(tmp_path_factory.mktemp("models") / "llama4")


def staged_spec(model: Path, runs: Path, tp: tuple[int, int, int, int] = (1, 1, 1, 1),
                **kw: object) -> LaunchSpec:
    """enc [0,1), enc [1,4), dec [0,3), dec [3,4); ``tp`` = each stage's tp_size."""
    ranges = (*(("encoder", r) for r in ENCODERS), *(("decoder", r) for r in DECODERS))
    groups = tuple(WorkerGroup(role, 1, t, layer_range=r)
                   for (role, r), t in zip(ranges, tp, strict=True))
    return LaunchSpec(groups=groups, runs_path=runs, encode_batch=3, streams=2, dtype="float32",
                      **model_fields(str(model)), **kw)  # type: ignore[arg-type]


def _active(stats: dict) -> list[int]:
    """Requests each stage's rank 0 holds (followers report no ``active``)."""
    return [w["load"].get("active") for w in stats["workers"] if "active" in w["load"]]


def _kv_bytes(stats: dict) -> tuple[int, int]:
    """KV bytes the encoder stages sent and the decoder stages received (heartbeat loads)."""
    loads = [w["load"] for w in stats["workers"]]
    return (sum(x.get("kv_bytes_sent", 0) for x in loads),
            sum(x.get("kv_bytes_received", 0) for x in loads))


async def _stats(client: AsyncClient, idle: bool) -> dict:
    """The coordinator's stats, once the heartbeats say every stage holds nothing and every
    KV byte sent arrived (when ``idle``; heartbeats lag the work by up to an interval)."""
    deadline = time.monotonic() + 10
    while True:
        stats = (await client.stats()).stats
        sent, got = _kv_bytes(stats)
        settled = _active(stats) == [0, 0, 0, 0] and sent == got > 0
        if not idle or settled or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
def mesh(llama4: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """The tp_size 1 staged mesh the greedy test serves and the lost-stage test (last) breaks.
    Dynamic B_E: any 3 of the workload's prompts hold > 12 tokens (an adjusted batch)."""
    spec = staged_spec(llama4, tmp_path_factory.mktemp("runs"), heartbeat_interval_s=0.5,
                       heartbeat_timeout_s=8.0, adjust_token_sum="1,12")
    with LocalMesh(spec, startup_timeout_s=180) as running:
        yield running


def test_greedy_matches_transformers_with_b_m_2(mesh: LocalMesh, llama4: Path) -> None:
    _check_greedy(mesh, llama4, (1, 1, 1, 1))


@pytest.mark.slow  # TP ranks start slowly on a loaded machine
def test_greedy_matches_transformers_with_tp_2_stages(llama4: Path, tmp_path: Path) -> None:
    tp = (1, 2, 2, 1)  # encoder stage 1 and decoder stage 0 are TP groups of 2
    spec = staged_spec(llama4, tmp_path, tp, heartbeat_timeout_s=30.0,
                       adjust_token_sum="1,12")
    with LocalMesh(spec, startup_timeout_s=180) as running:
        _check_greedy(running, llama4, tp)
        assert running.stop(grace_s=30) == []


def _check_greedy(mesh: LocalMesh, llama4: Path, tp: tuple[int, int, int, int]) -> None:
    work = workload(128, 14, seed=3) + [([9, 10, 11], 1)]  # one finishes at its first token
    expected = hf_greedy(llama4, work)
    assert max(len(set(row)) for row in expected) > 4  # the reference is not degenerate

    async def go() -> tuple[list[P.Result], dict]:
        async with AsyncClient(mesh.client_endpoint) as client:
            results = await asyncio.gather(*(
                client.generate(prompt_ids=p, max_new_tokens=n, timeout_s=120)
                for p, n in work))
            return list(results), await _stats(client, idle=True)

    results, stats = asyncio.run(go())
    assert [list(r.tokens) for r in results] == expected
    for r in results:
        life = r.lifecycle
        assert life.t_encode_start <= life.t_encode_end <= life.t_first_token <= life.t_finish
        assert life.t_kv_sent is not None and len(life.t_tokens) == len(r.tokens)
        if len(r.tokens) > 1:  # it reached the decoder side
            assert life.t_kv_received is not None
    pipe = stats["pipeline"]
    assert pipe["B_m"] == 2 and pipe["failed_passes"] == 0
    assert stats["requests"]["be_adjustments"] > 0  # dynamic B_E on the encoder pipeline
    assert pipe["encoder_stages"] == [list(r) for r in ENCODERS]
    assert pipe["decoder_stages"] == [list(r) for r in DECODERS]
    assert pipe["encode_passes"] >= len(work) // 3  # B_E = 3
    per_worker = stats["per_worker"]  # both micro-batches ran decode passes
    assert {"stream0", "stream1"} <= set(per_worker), per_worker.keys()
    # nothing stranded: the first-token finisher's KV was freed on the decoder stages too
    assert _active(stats) == [0, 0, 0, 0]
    ranks = sorted(w["worker_id"] for w in stats["workers"])
    assert len(ranks) == sum(tp) and (tp[1] == 1 or "enc1.r1" in ranks), ranks
    sent, got = _kv_bytes(stats)
    assert sent == got > 0


def test_serve_and_up_accept_a_staged_waa_plan(llama4: Path, tmp_path: Path) -> None:
    from coordinator.commands import serve
    from coordinator.commands.up import runnable_problem
    from coordinator.planner.plan import Plan
    from coordinator.planner.plan import WorkerGroup as PlanGroup

    cfg = model_fields(str(llama4))["model_config"]
    groups = (*(PlanGroup("encoder", 1, 1, r) for r in ENCODERS),
              *(PlanGroup("decoder", 1, 1, r) for r in DECODERS))
    plan = Plan(policy="waa-c", model=cfg, workload="t", latency_bound_s=10.0, sla="b",
                num_workers=4, worker_groups=groups, B_E=3, B_D=9.0, N_D=None, B_m=2,
                microbatches=2, adjust={"token_sum": [10.0, 40.0], "decode_batch": [2.0, 8.0]},
                predicted={}, search={}, profile_meta={})
    assert runnable_problem(plan, null_model=False) is None
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model", str(llama4), "--plan", str(path),
                              "--dtype", "float32", "--runs-dir", str(tmp_path / "runs")])
    spec = serve.spec_from_args(args)
    assert spec.waa_staged and spec.streams == 2 and spec.encode_batch == 3
    assert [(g.role, g.layer_range) for g in spec.groups] == [
        *(("encoder", r) for r in ENCODERS), *(("decoder", r) for r in DECODERS)]
    flags = spec.coordinator_child(0).argv
    assert "--waa-decoder-layers" in flags and "0:3,3:4" in flags
    tp2 = Plan(**{**plan.__dict__, "num_workers": 5, "worker_groups": (
        groups[0], PlanGroup("encoder", 2, 2, (1, 4)), *groups[2:])})
    assert runnable_problem(tp2, null_model=False) is None  # a stage may be a TP group
    gap = Plan(**{**plan.__dict__, "worker_groups": (*groups[:3], PlanGroup("decoder", 1, 1,
                                                                             (2, 4)))})
    assert "contiguous" in (runnable_problem(gap, null_model=False) or "")


def test_a_lost_decoder_stage_fails_its_requests_without_a_hang(mesh: LocalMesh) -> None:
    """Runs last: it breaks the module's mesh."""
    async def go() -> list[BaseException | P.Result]:
        async with AsyncClient(mesh.client_endpoint) as client:
            futures = [asyncio.ensure_future(client.generate(
                prompt_ids=[5, i + 4], max_new_tokens=120, timeout_s=60)) for i in range(4)]
            await asyncio.sleep(0.3)
            dec1 = next(c for c in mesh.workers if c.name.endswith("dec1"))
            os.kill(dec1.pid, signal.SIGKILL)
            out = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True),
                                         timeout=45)
            with pytest.raises(Unavailable):  # no decoder pipeline: refused, not queued
                await client.generate(prompt_ids=[4], max_new_tokens=2, timeout_s=10)
            return out

    out = asyncio.run(go())
    lost = [r for r in out if isinstance(r, WorkerLost)]
    assert lost and all(isinstance(r, (WorkerLost, P.Result)) for r in out), out
    assert all("dec1" in str(r) for r in lost)
