"""Sampled decoding with a per-request seed gives the same tokens through the mesh, for every
policy, as in-process ``exegpt generate`` (``common.engine.generate``) with the same seed: each
token's draw depends only on (seed, output position) (``common.engine.sampling.step_seed``),
wherever it is sampled (WAA: position 0 on the encoder, the rest on the decoder; pipelines: the
last stage)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
import torch

from common.client import AsyncClient
from common.engine.generate import generate
from common.engine.sampling import Sampler, SamplingParams, step_seed
from coordinator.commands.serve import model_fields
from coordinator.launch import LaunchSpec, LocalMesh, WorkerGroup
from tests.runner.tinymodels import make_llama, make_t5

torch.set_num_threads(1)


def _work(vocab: int, n: int, seed: int) -> list[tuple[list[int], SamplingParams]]:
    """Mixed prompts, lengths and sampling knobs, each request with its own seed."""
    rng = random.Random(seed)
    knobs = [{"temperature": 1.0}, {"temperature": 0.8, "top_k": 20},
             {"temperature": 1.2, "top_p": 0.9}, {"temperature": 0.7, "top_k": 30, "top_p": 0.95}]
    return [([rng.randrange(4, vocab) for _ in range(rng.randint(1, 20))],
             SamplingParams(max_new_tokens=rng.randint(2, 16), seed=rng.randrange(10_000),
                            **knobs[i % len(knobs)]))  # type: ignore[arg-type]
            for i in range(n)]


def test_a_draw_depends_only_on_seed_and_position() -> None:
    """WAA's split: one sampler draws position 0, a fresh one continues at position 1."""
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1)) * 2
    params = SamplingParams(temperature=1.0, seed=42)
    whole = Sampler()
    whole.add("r", params)
    alone = [whole.sample(["r"], logits[i:i + 1])[0] for i in range(6)]
    first, rest = Sampler(), Sampler()
    first.add("r", params)
    rest.add("r", params, position=1)
    split = first.sample(["r"], logits[:1]) + [rest.sample(["r"], logits[i:i + 1])[0]
                                               for i in range(1, 6)]
    assert split == alone
    batch = Sampler()  # batched with another request, in another order: the same draws
    batch.add("x", SamplingParams(temperature=1.0, seed=7))
    batch.add("r", params)
    assert [batch.sample(["x", "r"], torch.stack([logits[i], logits[i]]))[1]
            for i in range(6)] == alone
    assert len({step_seed(s, p) for s in range(30) for p in range(30)}) == 900
    with pytest.raises(ValueError, match="position"):
        Sampler().add("r", params, position=-1)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"llama": make_llama(root / "llama"), "t5": make_t5(root / "t5")}


def _groups(policy: str) -> tuple[WorkerGroup, ...]:
    if policy == "waa":
        return (WorkerGroup("encoder", 1), WorkerGroup("decoder", 1))
    return (WorkerGroup("pipeline", 1), WorkerGroup("pipeline", 1))


CASES = [pytest.param("llama", "waa", id="llama-waa"),
         pytest.param("t5", "waa", id="t5-waa"),
         pytest.param("llama", "rra", id="llama-rra"),
         pytest.param("t5", "rra", id="t5-rra"),
         pytest.param("llama", "static", marks=pytest.mark.slow, id="llama-static"),
         pytest.param("llama", "continuous", marks=pytest.mark.slow, id="llama-continuous")]


@pytest.mark.parametrize(("family", "policy"), CASES)
def test_sampled_mesh_matches_in_process_generate(models: dict[str, Path], tmp_path: Path,
                                                  family: str, policy: str) -> None:
    path = models[family]
    work = _work(96 if family == "t5" else 128, 10, seed=4)
    expected = [r.token_ids for r in generate(str(path), [p for p, _ in work],
                                              [s for _, s in work], dtype="float32")]
    assert len({tuple(row) for row in expected}) == len(expected)  # real, varied samples
    spec = LaunchSpec(groups=_groups(policy), runs_path=tmp_path, policy=policy,
                      encode_batch=4, n_d=3, dtype="float32", **model_fields(str(path)))

    async def run(endpoint: str) -> list[list[int]]:
        async with AsyncClient(endpoint) as client:
            results = await asyncio.gather(*(
                client.generate(prompt_ids=p, max_new_tokens=s.max_new_tokens,
                                temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                seed=s.seed, timeout_s=120) for p, s in work))
        return [list(r.tokens) for r in results]

    with LocalMesh(spec, startup_timeout_s=120) as mesh:
        assert asyncio.run(run(mesh.client_endpoint)) == expected
        assert mesh.stop(grace_s=30) == []


def test_a_pipeline_rerun_continues_the_seeded_draws() -> None:
    """A re-run (prompt + the k tokens already streamed, ``output_offset`` = k) on a stage
    samples from position k: it continues the undisturbed run's tokens."""
    from common import protocol as P
    from common.backend_engine import load_spec
    from common.backend_stage_engine import EngineStageBackend

    stage = EngineStageBackend(load_spec("tiny-llama"), dtype="float32")
    sampling = P.Sampling(temperature=1.0, top_k=40, seed=11, ignore_eos=True)
    prompt = (5, 17, 33, 42)

    def run(req: P.EncodeRequest, steps: int) -> list[int]:
        out = [t.token for t in stage.run(P.StagePass(
            pass_id=0, stream=0, kind="encode", req_ids=(req.req_id,), requests=(req,))).tokens]
        for _ in range(steps - 1):
            out += [t.token for t in stage.run(P.StagePass(
                pass_id=0, stream=0, kind="decode", req_ids=(req.req_id,),
                tokens=(out[-1],))).tokens]
        stage.drop([req.req_id])
        return out

    whole = run(P.EncodeRequest("a", prompt, 8, sampling), 8)
    again = run(P.EncodeRequest("b", prompt + tuple(whole[:3]), 5, sampling,
                                output_offset=3), 5)
    assert again == whole[3:]
    assert run(P.EncodeRequest("c", prompt, 8, sampling), 8) == whole
