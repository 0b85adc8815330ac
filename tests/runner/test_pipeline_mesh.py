"""Pipeline plans (static, continuous, RRA) through the real mesh: coordinator + stage worker
processes over sockets, with the null model and with real tiny models (token-identical to
transformers' greedy output under concurrent, mixed-length requests)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common import protocol as P
from common.backend import null_tokens
from common.client import AsyncClient
from common.errors import Cancelled, Unavailable, WorkerLost
from coordinator.commands.serve import model_fields
from coordinator.launch import LaunchSpec, LocalMesh, WorkerGroup
from tests.mesh.rawclient import random_work, raw_roundtrip
from tests.runner.tinymodels import hf_greedy, make_llama, make_t5, workload

VOCAB = 256  # tiny-llama, the null model's shape
ORDER = ("t_arrival", "t_queued", "t_encode_start", "t_encode_end", "t_first_token", "t_finish")
POLICIES = ("static", "continuous", "rra")


def _stages(n: int, tp_size: int = 1) -> tuple[WorkerGroup, ...]:
    return tuple(WorkerGroup("pipeline", 1, tp_size) for _ in range(n))


def _null_spec(runs: Path, policy: str, **kw: object) -> LaunchSpec:
    return LaunchSpec(groups=_stages(2), runs_path=runs, model_shape="tiny-llama",
                      policy=policy, encode_batch=6, n_d=3, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module", params=POLICIES)
def null_mesh(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
              ) -> Iterator[LocalMesh]:
    mesh = LocalMesh(_null_spec(tmp_path_factory.mktemp("runs"), request.param))
    mesh.start()
    yield mesh
    assert mesh.stop() == []  # every process left on its own
    assert all(c.poll() == 0 for c in mesh.children), [c.describe_exit() for c in mesh.children]


def test_null_model_answers_every_request_exactly_once(null_mesh: LocalMesh) -> None:
    work = random_work(40, seed=5, longest=30, vocab=VOCAB, prefix="n")
    got = raw_roundtrip(null_mesh.client_endpoint, work, timeout_ms=20_000)
    for req_id, prompt, max_new in work:
        msgs = got[req_id]
        assert isinstance(msgs[-1], P.Result), msgs[-1]
        streamed = [t for m in msgs[:-1] for t in m.tokens]  # type: ignore[attr-defined]
        assert streamed == list(msgs[-1].tokens) == null_tokens(prompt, max_new, VOCAB)
        life = msgs[-1].lifecycle
        stamps = [getattr(life, name) for name in ORDER]
        assert None not in stamps and stamps == sorted(stamps), life
        assert life.t_kv_sent is None and life.t_kv_received is None  # no KV handoff
        assert len(life.t_tokens) == max_new


def test_stats_show_the_streams_and_every_stage_freed(null_mesh: LocalMesh) -> None:
    async def go() -> P.Stats:
        async with AsyncClient(null_mesh.client_endpoint) as client:
            await asyncio.gather(*(client.generate(prompt_ids=[7, i + 1], max_new_tokens=5)
                                   for i in range(12)))
            deadline = time.monotonic() + 10
            while True:  # heartbeats carry each stage's running count
                stats = await client.stats()
                active = [w["load"].get("active") for w in stats.stats["workers"]]
                if active == [0, 0] or time.monotonic() > deadline:
                    return stats
                await asyncio.sleep(0.2)

    stats = asyncio.run(go()).stats
    pipe = stats["pipeline"]
    assert pipe["policy"] == null_mesh.spec.policy and len(pipe["streams"]) == 2
    assert pipe["encode_passes"] >= 2 and pipe["failed_passes"] == 0
    assert [w["load"].get("active") for w in stats["workers"]] == [0, 0]  # nothing stranded


def test_cancel_mid_stream_frees_the_request_on_every_stage(tmp_path: Path) -> None:
    spec = _null_spec(tmp_path, "rra", decode_cost_ms=5.0)
    with LocalMesh(spec) as mesh:
        async def go() -> list[int]:
            async with AsyncClient(mesh.client_endpoint) as client:
                other = asyncio.ensure_future(client.generate(prompt_ids=[3, 4],
                                                              max_new_tokens=60))
                seen: list[int] = []
                with pytest.raises(Cancelled):
                    async with client.stream(prompt_ids=[9, 9, 9], max_new_tokens=2000,
                                             req_id="long") as stream:
                        async for chunk in stream:
                            seen.extend(chunk.tokens)
                            if len(seen) >= 5:
                                await client.cancel("long")
                assert len(seen) < 2000
                result = await other  # the stream's other request runs on, unharmed
                assert list(result.tokens) == null_tokens([3, 4], 60, VOCAB)
                async with AsyncClient(mesh.client_endpoint) as fresh:  # the id is reusable
                    again = await fresh.generate(prompt_ids=[9, 9, 9], max_new_tokens=4,
                                                 req_id="long")
                assert list(again.tokens) == null_tokens([9, 9, 9], 4, VOCAB)
                for _ in range(50):
                    stats = (await client.stats()).stats
                    if [w["load"].get("active") for w in stats["workers"]] == [0, 0]:
                        return seen
                    await asyncio.sleep(0.2)
                raise AssertionError(f"stages still hold requests: {stats['workers']}")

        seen = asyncio.run(go())
        assert seen == null_tokens([9, 9, 9], len(seen), VOCAB)


def test_a_lost_stage_fails_its_requests_without_a_hang(tmp_path: Path) -> None:
    spec = _null_spec(tmp_path, "continuous", decode_cost_ms=20.0, heartbeat_interval_s=0.2,
                      heartbeat_timeout_s=1.5)
    with LocalMesh(spec) as mesh:
        async def go() -> list[BaseException | P.Result]:
            async with AsyncClient(mesh.client_endpoint) as client:
                jobs = [client.generate(prompt_ids=[5, i + 1], max_new_tokens=500,
                                        timeout_s=30) for i in range(4)]
                futures = [asyncio.ensure_future(j) for j in jobs]
                await asyncio.sleep(0.5)
                stage1 = next(c for c in mesh.workers if "stage1" in c.name)
                os.kill(stage1.pid, signal.SIGKILL)
                # a hang would run into the requests' own 30 s timeout (Timeout, not WorkerLost)
                out = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True),
                                             timeout=45)
                with pytest.raises(Unavailable):  # no pipeline: refused, not queued forever
                    await client.generate(prompt_ids=[1], max_new_tokens=2, timeout_s=10)
                return out

        out = asyncio.run(go())
        assert all(isinstance(r, WorkerLost) for r in out), out
        assert all("stage1" in str(r) for r in out)


# ---- real tiny models: token-identical to transformers -------------------------------------
def make_opt(directory: Path) -> Path:
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(11)
    cfg = OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                    num_attention_heads=4, max_position_embeddings=128, init_std=0.2,
                    word_embed_proj_dim=32, eos_token_id=2, bos_token_id=2, pad_token_id=1)
    OPTForCausalLM(cfg).save_pretrained(directory)
    return directory


MODELS = {"llama": (make_llama, 128, 2), "opt": (make_opt, 128, 2), "t5": (make_t5, 96, 1)}
DEFAULT_RUNS = {("llama", "static"), ("llama", "continuous"), ("llama", "rra"),
                ("opt", "rra"), ("t5", "continuous")}
CASES = [pytest.param(m, p, 1, marks=() if (m, p) in DEFAULT_RUNS else pytest.mark.slow,
                      id=f"{m}-{p}") for m in MODELS for p in POLICIES]
CASES.append(pytest.param("llama", "rra", 2, marks=pytest.mark.slow, id="llama-rra-tp2"))


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: make(root / name) for name, (make, _, _) in MODELS.items()}


async def _run_all(endpoint: str, work: list[tuple[list[int], int]]) -> list[P.Result]:
    async with AsyncClient(endpoint) as client:
        return list(await asyncio.gather(*(
            client.generate(prompt_ids=p, max_new_tokens=n, timeout_s=120) for p, n in work)))


@pytest.mark.parametrize(("family", "policy", "tp_size"), CASES)
def test_greedy_matches_transformers(family: str, policy: str, tp_size: int,
                                     tiny_models: dict[str, Path], tmp_path: Path) -> None:
    _, vocab, num_stages = MODELS[family]
    model = tiny_models[family]
    work = workload(vocab, 12, seed=3)
    expected = hf_greedy(model, work)
    assert max(len(set(row)) for row in expected) > 4  # the reference is not degenerate
    spec = LaunchSpec(groups=_stages(num_stages, tp_size), runs_path=tmp_path, policy=policy,
                      encode_batch=4, n_d=3, dtype="float32", **model_fields(str(model)))
    with LocalMesh(spec, startup_timeout_s=120) as mesh:
        results = asyncio.run(_run_all(mesh.client_endpoint, work))
        assert [list(r.tokens) for r in results] == expected
        for r in results:
            stamps = [getattr(r.lifecycle, name) for name in ORDER]
            assert None not in stamps and stamps == sorted(stamps), r.lifecycle
            assert len(r.lifecycle.t_tokens) == len(r.tokens)
        assert mesh.stop(grace_s=30) == []


def test_serve_runs_an_rra_plan_file(tmp_path: Path) -> None:
    """What `exegpt serve --null-model --plan plan.json` launches for an RRA plan: a stage
    worker per plan group holding its layers, B_E, N_D and the streams from the plan."""
    import argparse

    from common.models.config import ModelConfig
    from coordinator.commands import serve
    from coordinator.planner.plan import Plan
    from coordinator.planner.plan import WorkerGroup as PlanGroup

    plan = Plan(policy="rra", model=ModelConfig.preset("tiny-llama").to_dict(), workload="t",
                latency_bound_s=10.0, sla="b", num_workers=2,
                worker_groups=(PlanGroup("pipeline", 1, 1, (0, 1)),
                               PlanGroup("pipeline", 1, 1, (1, 2))),
                B_E=5, B_D=9.0, N_D=2, B_m=None, microbatches=3, adjust={}, predicted={},
                search={}, profile_meta={})
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--null-model", "--model-shape", "tiny-llama",
                              "--plan", str(path), "--runs-dir", str(tmp_path / "runs")])
    spec = serve.spec_from_args(args)
    assert (spec.policy, spec.encode_batch, spec.n_d, spec.streams) == ("rra", 5, 2, 3)
    with LocalMesh(spec) as mesh:
        work = [(f"p{i}", (i + 1, 2, 3), 3 + i % 7) for i in range(20)]
        got = raw_roundtrip(mesh.client_endpoint, work)
        assert all(list(got[r][-1].tokens) == null_tokens(p, n, VOCAB)  # type: ignore[attr-defined]
                   for r, p, n in work)

        async def stats() -> dict:
            async with AsyncClient(mesh.client_endpoint) as client:
                return (await client.stats()).stats

        pipe = asyncio.run(stats())["pipeline"]
        assert pipe["stages"] == [[0, 1], [1, 2]] and len(pipe["streams"]) == 3
        assert (pipe["B"], pipe["N_D"]) == (5, 2)
