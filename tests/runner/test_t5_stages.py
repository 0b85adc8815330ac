"""T5 over several pipeline stages (RRA, static, continuous): encodes take two laps (encoder
layers, then cross K/V + the start token; ``common.backend_stage_engine``). Stage backends in
process, then real stage-worker processes behind the real coordinator; greedy output must be
token-identical to transformers under concurrent, mixed-length requests."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
import torch

from common import protocol as P
from common.backend_engine import load_spec
from common.backend_stage_engine import EngineStageBackend
from common.client import AsyncClient
from common.models.registry import ModelSpec
from coordinator.commands.serve import model_fields
from coordinator.launch import LaunchSpec, LocalMesh, WorkerGroup
from tests.runner.stage_coordinator import requests as _requests
from tests.runner.tinymodels import hf_greedy, workload

torch.set_num_threads(1)
VOCAB = 96
Split = list[tuple[tuple[int, int], tuple[int, int]]]  # per stage: (encoder, decoder) layers


def make_t5_43(directory: Path) -> Path:
    """A tiny random T5 with 4 encoder and 3 decoder layers (room for uneven splits)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(5)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=4,
                   num_decoder_layers=3, dropout_rate=0.0, relative_attention_num_buckets=8,
                   relative_attention_max_distance=20, decoder_start_token_id=0,
                   initializer_factor=3.0, feed_forward_proj="relu")
    T5ForConditionalGeneration(cfg).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def t5(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelSpec]:
    path = make_t5_43(tmp_path_factory.mktemp("t5"))
    return path, load_spec(str(path))


class LapChain:
    """Stage backends in one process, handing passes on as the stage workers do (lap 1 goes
    from the last stage back to stage 0); records which stages saw ``encoder_out``."""

    def __init__(self, spec: ModelSpec, split: Split) -> None:
        n = len(split)
        self.stages = [EngineStageBackend(spec, dec, enc, dtype="float32",
                                          encoder_out_onward=s + 2 < n)
                       for s, (enc, dec) in enumerate(split)]
        self.pass_id = 0
        self.free: list[str] = []
        self.out: dict[str, list[int]] = {}
        self.last: dict[str, int] = {}
        self.saw_encoder_out: set[int] = set()

    def run(self, sp: P.StagePass) -> list:
        s = 0
        while True:
            if sp.encoder_out is not None:
                self.saw_encoder_out.add(s)
            out = self.stages[s].run(sp)
            if out.lap_back:
                sp, s = dataclasses.replace(sp, lap=1, hidden=None,
                                            encoder_out=out.encoder_out), 0
                continue
            if s == len(self.stages) - 1:
                return out.tokens
            sp, s = dataclasses.replace(sp, hidden=out.hidden, encoder_out=out.encoder_out), s + 1

    def send(self, kind: str, req_ids: list[str], **kw: object) -> None:
        sp = P.StagePass(pass_id=self.pass_id, stream=0, kind=kind, req_ids=tuple(req_ids),
                         free=tuple(self.free), **kw)  # type: ignore[arg-type]
        self.pass_id, self.free = self.pass_id + 1, []
        for tok in self.run(sp):
            self.out.setdefault(tok.req_id, []).append(tok.token)
            self.last[tok.req_id] = tok.token
            if tok.finished:
                self.free.append(tok.req_id)
                del self.last[tok.req_id]

    def generate(self, work: list[tuple[list[int], int]]) -> list[list[int]]:
        """Half encodes, decodes twice, the other half joins (continuous-style), to the end."""
        reqs = _requests(work, "r")
        half = len(reqs) // 2
        for group in (reqs[:half], reqs[half:]):
            self.send("encode", [r.req_id for r in group], requests=tuple(group))
            for _ in range(2 if group is reqs[:half] else 10_000):
                if not self.last:
                    break
                ids = list(self.last)
                self.send("decode", ids, tokens=tuple(self.last[r] for r in ids))
        self.send("decode", [])
        assert all(st.num_active == 0 for st in self.stages)  # every stage freed everything
        return [self.out[r.req_id] for r in reqs]


SPLITS = {
    "even-2": [((0, 2), (0, 2)), ((2, 4), (2, 3))],
    "uneven-2": [((0, 3), (0, 1)), ((3, 4), (1, 3))],
    "uneven-2b": [((0, 1), (0, 2)), ((1, 4), (2, 3))],
    "three": [((0, 1), (0, 1)), ((1, 3), (1, 2)), ((3, 4), (2, 3))],
}


@pytest.mark.parametrize("name", list(SPLITS))
def test_t5_stage_backends_match_transformers(t5: tuple[Path, ModelSpec], name: str) -> None:
    path, spec = t5
    work = workload(VOCAB, 8, seed=6)
    expected = hf_greedy(path, work)
    assert max(len(set(row)) for row in expected) > 4  # the reference is not degenerate
    chain = LapChain(spec, SPLITS[name])
    assert chain.generate(work) == expected
    # the encoder output reaches exactly the stages that need it in lap 1 (not the last)
    assert chain.saw_encoder_out == set(range(len(SPLITS[name]) - 1))


def test_bad_t5_layouts_are_refused_with_the_reason(t5: tuple[Path, ModelSpec]) -> None:
    _, spec = t5
    with pytest.raises(ValueError, match="first stage holds layer 0 of both"):
        EngineStageBackend(spec, (0, 1), (1, 4))
    with pytest.raises(ValueError, match="non-empty encoder_layer_range"):
        EngineStageBackend(spec, (1, 3), (4, 4))


def test_a_lap_travels_on_the_wire_and_only_on_encode_passes() -> None:
    import numpy as np

    rows = np.arange(6, dtype=np.float32).reshape(2, 3)
    sp = P.StagePass(pass_id=3, stream=1, kind="encode", req_ids=("a",), lap=1,
                     requests=(P.EncodeRequest("a", (5, 6), 2),), encoder_out=rows)
    back = P.decode(P.encode(sp))
    assert isinstance(back, P.StagePass) and back.lap == 1
    assert np.array_equal(back.encoder_out.as_numpy(), rows)  # type: ignore[union-attr]
    for bad in ({"kind": "decode", "requests": (), "tokens": (1,)}, {"lap": 2}):
        with pytest.raises(ValueError, match="lap"):
            dataclasses.replace(sp, **bad).check()  # type: ignore[arg-type]


def test_lap_one_without_the_encoder_output_fails_cleanly(t5: tuple[Path, ModelSpec]) -> None:
    _, spec = t5
    chain = LapChain(spec, SPLITS["even-2"])
    (req,) = _requests([([5, 6, 7], 3)], "x")
    stage0 = chain.stages[0]
    stage0.run(P.StagePass(pass_id=1, stream=0, kind="encode", req_ids=("x0",),
                           requests=(req,)))
    with pytest.raises(ValueError, match="needs the encoder output"):
        stage0.run(P.StagePass(pass_id=1, stream=0, kind="encode", req_ids=("x0",),
                               requests=(req,), lap=1))
    assert stage0.num_active == 0  # the failed pass dropped its request


# ---- real processes behind the real coordinator -----------------------------------------------
def _groups(split: Split, tp: tuple[int, ...] = ()) -> tuple[WorkerGroup, ...]:
    return tuple(WorkerGroup("pipeline", 1, tp[s] if tp else 1, layer_range=dec,
                             encoder_layer_range=enc) for s, (enc, dec) in enumerate(split))


async def _run_all(endpoint: str, work: list[tuple[list[int], int]]) -> list[P.Result]:
    async with AsyncClient(endpoint) as client:
        return list(await asyncio.gather(*(
            client.generate(prompt_ids=p, max_new_tokens=n, timeout_s=120) for p, n in work)))


MESH_CASES = [
    pytest.param("rra", "even-2", (), id="rra-even"),
    pytest.param("rra", "uneven-2", (), id="rra-uneven"),
    pytest.param("static", "uneven-2b", (), id="static"),
    pytest.param("continuous", "three", (), id="continuous-3"),
    pytest.param("rra", "even-2", (2, 1), marks=pytest.mark.slow, id="rra-tp2"),
]


@pytest.mark.parametrize(("policy", "split", "tp"), MESH_CASES)
def test_t5_pipeline_mesh_matches_transformers(t5: tuple[Path, ModelSpec], tmp_path: Path,
                                               policy: str, split: str, tp: tuple[int, ...]
                                               ) -> None:
    path, _ = t5
    work = workload(VOCAB, 12, seed=3)
    expected = hf_greedy(path, work)
    spec = LaunchSpec(groups=_groups(SPLITS[split], tp), runs_path=tmp_path, policy=policy,
                      encode_batch=4, n_d=3, dtype="float32", **model_fields(str(path)))
    with LocalMesh(spec, startup_timeout_s=120) as mesh:
        results = asyncio.run(_run_all(mesh.client_endpoint, work))
        assert [list(r.tokens) for r in results] == expected
        for r in results:
            life = r.lifecycle
            assert life.t_encode_start is not None and life.t_encode_end is not None
            assert life.t_encode_start <= life.t_encode_end <= (life.t_first_token or 0)
        assert mesh.stop(grace_s=30) == []


def test_serve_runs_a_two_stage_t5_plan_file(t5: tuple[Path, ModelSpec], tmp_path: Path
                                             ) -> None:
    """`exegpt serve --model M --plan plan.json` with an RRA plan of T5 over 2 stages (uneven
    encoder/decoder split): each stage gets its plan layer ranges; greedy == transformers."""
    import argparse

    from coordinator.commands import serve
    from coordinator.planner.plan import Plan
    from coordinator.planner.plan import WorkerGroup as PlanGroup

    path, spec = t5
    plan = Plan(policy="rra", model=spec.config.to_dict(), workload="t", latency_bound_s=10.0,
                sla="b", num_workers=2,
                worker_groups=(PlanGroup("pipeline", 1, 1, (0, 1), (0, 3)),
                               PlanGroup("pipeline", 1, 1, (1, 3), (3, 4))),
                B_E=3, B_D=6.0, N_D=2, B_m=None, microbatches=2, adjust={}, predicted={},
                search={}, profile_meta={})
    (tmp_path / "plan.json").write_text(plan.to_json())
    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model", str(path), "--dtype", "float32",
                              "--plan", str(tmp_path / "plan.json"),
                              "--runs-dir", str(tmp_path / "runs")])
    launch = serve.spec_from_args(args)
    assert [(g.encoder_layer_range, g.layer_range) for g in launch.stages] == \
        [((0, 3), (0, 1)), ((3, 4), (1, 3))]
    work = workload(VOCAB, 8, seed=8)
    with LocalMesh(launch, startup_timeout_s=120) as mesh:
        results = asyncio.run(_run_all(mesh.client_endpoint, work))
        assert [list(r.tokens) for r in results] == hf_greedy(path, work)

        async def stats() -> dict:
            async with AsyncClient(mesh.client_endpoint) as client:
                return (await client.stats()).stats

        got = asyncio.run(stats())
        pipe = got["pipeline"]
        assert pipe["stages"] == [[0, 1], [1, 3]] and (pipe["B"], pipe["N_D"]) == (3, 2)
        assert pipe["failed_passes"] == 0
        busy = got["overall"]["stage_busy_s"]  # lap 1's compute folded into each stage's entry
        assert len(busy) == 2 and min(busy) > 0, busy
