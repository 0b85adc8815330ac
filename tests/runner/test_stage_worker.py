"""Pipeline stage workers (RRA, static, continuous plans): the stage backends driven in
process by StagePass values, then real stage-worker processes driven by a fake coordinator
(``tests/runner/stage_coordinator.py``); ``tests/runner/test_pipeline_mesh.py`` runs them
behind the real one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from common import protocol as P
from common.backend import null_tokens
from common.backend_engine import load_spec
from common.backend_stage import NullStageBackend, StageBackendBase
from common.backend_stage_engine import EngineStageBackend
from common.models.config import ModelConfig
from common.models.registry import ModelSpec
from tests.engine.tiny_hf import greedy_reference, hf_model, save
from tests.runner.stage_coordinator import FakeCoordinator, generate, spawn, stop
from tests.runner.stage_coordinator import requests as _requests
from tests.runner.tinymodels import hf_greedy, make_llama, make_t5, workload

torch.set_num_threads(1)


class Chain:
    """Stages in one process: each pass goes stage 0 -> last, hidden rows handed on; each
    stream keeps its own running requests and its own ``free`` list, as the coordinator does."""

    def __init__(self, stages: list[StageBackendBase]) -> None:
        self.stages = stages
        self.pass_id = 0
        self.free: dict[int, list[str]] = {}  # finished on the last stage: freed next pass
        self.out: dict[str, list[int]] = {}
        self.last: dict[int, dict[str, int]] = {}

    def send(self, kind: str, req_ids: list[str], tokens: tuple[int, ...] = (),
             requests: tuple[P.EncodeRequest, ...] = (), stream: int = 0) -> list:
        sp = P.StagePass(pass_id=self.pass_id, stream=stream, kind=kind,
                         req_ids=tuple(req_ids), tokens=tokens, requests=requests,
                         free=tuple(self.free.pop(stream, ())))
        self.pass_id += 1
        for stage in self.stages:
            out = stage.run(sp)
            sp = dataclasses.replace(sp, hidden=out.hidden)
        last = self.last.setdefault(stream, {})
        for tok in out.tokens:
            self.out.setdefault(tok.req_id, []).append(tok.token)
            last[tok.req_id] = tok.token
            if tok.finished:
                self.free.setdefault(stream, []).append(tok.req_id)
                del last[tok.req_id]
        return out.tokens

    def encode(self, requests: list[P.EncodeRequest], stream: int = 0) -> None:
        self.send("encode", [r.req_id for r in requests], requests=tuple(requests),
                  stream=stream)

    def decode(self, steps: int = 10_000) -> None:
        """Round robin over the streams, in the order each stream's requests were admitted
        (after early finishes, not the cache's slot order)."""
        for _ in range(steps):
            live = [s for s, last in self.last.items() if last]
            if not live:
                return
            for stream in live:
                ids = list(self.last[stream])
                self.send("decode", ids, tokens=tuple(self.last[stream][r] for r in ids),
                          stream=stream)


def _engine_chain(spec: ModelSpec, cuts: list[int]) -> Chain:
    bounds = [0, *cuts, spec.config.num_layers]
    return Chain([EngineStageBackend(spec, (a, b), dtype="float32")
                  for a, b in zip(bounds, bounds[1:], strict=False)])


def _run_joining(chain: Chain, work: list[tuple[list[int], int]]) -> list[list[int]]:
    """Two streams: a third of the requests encode in stream 0 and decode a few steps, then
    a third join stream 0 and the rest start stream 1 (continuous-style)."""
    cut = len(work) // 3
    a, b, c = (_requests(work[:cut], "a"), _requests(work[cut:2 * cut], "b"),
               _requests(work[2 * cut:], "c"))
    chain.encode(a)
    chain.decode(steps=2)
    chain.encode(b)
    chain.encode(c, stream=1)
    chain.decode()
    for stream in (0, 1):
        chain.send("decode", [], stream=stream)  # the last frees reach every stage
    for stage in chain.stages:
        assert stage.num_active == 0
        assert sum(len(c) for c in getattr(stage, "_caches", {}).values()) == 0
    return [chain.out[r.req_id] for r in a + b + c]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelSpec]:
    path = make_llama(tmp_path_factory.mktemp("llama"))
    return path, load_spec(str(path))


@pytest.mark.parametrize("cuts", [[], [1]], ids=["one-stage", "two-stages"])
def test_llama_stages_match_transformers(llama: tuple[Path, ModelSpec], cuts: list[int],
                                         ) -> None:
    path, spec = llama
    work = workload(128, 8, seed=4)
    expected = hf_greedy(path, work)
    assert max(len(set(row)) for row in expected) > 4  # the reference is not degenerate
    assert _run_joining(_engine_chain(spec, cuts), work) == expected


def test_opt_two_stages_match_transformers(tmp_path: Path) -> None:
    model = hf_model("opt", seed=2)
    spec = load_spec(str(save(model, tmp_path / "opt")))
    prompts = [[5, 17, 33, 42, 61, 7, 9], [11, 3, 250], [8, 8, 8, *range(20, 32)], [99]]
    max_new = [10, 4, 8, 6]
    expected = greedy_reference(model, prompts, max_new)
    chain = _engine_chain(spec, [1, 3])  # three stages: 1 + 2 + 1 layers
    work = list(zip(prompts, max_new, strict=True))
    assert _run_joining(chain, work) == expected


def test_t5_one_stage_matches_transformers(tmp_path: Path) -> None:
    path = make_t5(tmp_path / "t5")
    spec = load_spec(str(path))
    work = workload(96, 6, seed=2)
    chain = Chain([EngineStageBackend(spec, dtype="float32")])
    assert _run_joining(chain, work) == hf_greedy(path, work)


def test_a_t5_stage_without_encoder_layers_is_refused_with_the_reason(tmp_path: Path) -> None:
    spec = load_spec("tiny-t5")  # T5 over several stages: tests/runner/test_t5_stages.py
    with pytest.raises(ValueError, match="non-empty encoder_layer_range"):
        EngineStageBackend(spec, (1, 2), (2, 2))


def test_bad_pass_drops_its_requests_and_the_stage_keeps_serving(
        llama: tuple[Path, ModelSpec]) -> None:
    _, spec = llama
    chain = _engine_chain(spec, [1])
    chain.encode(_requests([([5, 6, 7], 6), ([9, 10], 6)], "ok"))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        chain.encode(_requests([([5, 999], 4)], "bad"))
    with pytest.raises(ValueError, match="not running"):
        chain.send("decode", ["ghost"], tokens=(5,))
    assert [s.num_active for s in chain.stages] == [2, 2]
    with pytest.raises(ValueError, match="another stream"):
        chain.send("decode", ["ok0"], tokens=(5,), stream=1)
    assert [s.num_active for s in chain.stages] == [1, 2]  # the failing stage dropped it
    del chain.last[0]["ok0"]
    chain.free[0] = ["ok0"]  # as the coordinator does after a failed pass
    chain.decode()
    assert len(chain.out["ok1"]) == 6 and [s.num_active for s in chain.stages] == [1, 0]
    chain.send("decode", [])
    assert [s.num_active for s in chain.stages] == [0, 0]


def test_null_stages_pass_real_sized_rows_and_emit_null_tokens() -> None:
    model = ModelConfig.preset("tiny-llama")
    chain = Chain([NullStageBackend(model, True, False), NullStageBackend(model, False, True)])
    work = [([5, 6, 7], 4), ([11], 2)]
    reqs = _requests(work, "n")
    sp = P.StagePass(pass_id=0, stream=0, kind="encode", req_ids=("n0", "n1"),
                     requests=tuple(reqs))
    hidden = chain.stages[0].run(sp).hidden
    assert hidden.dtype == "bfloat16" and hidden.shape == (4, model.hidden_size)
    chain.stages[0].drop(["n0", "n1"])
    chain.encode(reqs)
    chain.decode()
    assert [chain.out[r.req_id] for r in reqs] == [
        null_tokens(p, n, model.vocab_size) for p, n in work]



def test_stage_loop_forwards_to_next_reports_from_the_last_and_fails_bad_passes() -> None:
    from common.workerconfig import WorkerConfig
    from decoder_worker.pipeline import StageLoop
    from tests.mesh.test_worker_loops import FakeLink, Log

    model = ModelConfig.preset("tiny-llama")
    cfgs = [WorkerConfig(role="pipeline", coordinator="ipc:///x", worker_id=f"st{s}",
                         kv_bind="ipc:///kv", stage=s) for s in (0, 1)]
    links = [FakeLink(), FakeLink()]
    loops = [StageLoop(cfgs[s], links[s], NullStageBackend(model, s == 0, s == 1), Log())
             for s in (0, 1)]
    reqs = tuple(_requests([([5, 6], 2)], "q"))
    links[0].inbox.put(P.StagePass(pass_id=1, stream=3, kind="encode", req_ids=("q0",),
                                   requests=reqs))
    links[0].inbox.put(P.StagePass(pass_id=2, stream=3, kind="encode", req_ids=("q1",),
                                   requests=(dataclasses.replace(reqs[0], req_id="q1",
                                                                 prompt_ids=(5, 10**6)),)))
    assert loops[0].run() == 0  # the idle inbox says stop
    (fwd, to), (err, to_coord) = links[0].sent
    assert to == "next" and to_coord is None
    assert fwd.hidden.shape == (2, model.hidden_size) and len(fwd.stage_times) == 1
    assert err.pass_id == 2 and err.worker_id == "st0" and "vocabulary" in err.error
    assert loops[0].load()["failed_passes"] == 1 and loops[0].backend.num_active == 1
    links[1].inbox.put(fwd)
    assert loops[1].run() == 0
    ((done, dest),) = links[1].sent
    assert dest is None and done.pass_id == 1 and done.stream == 3 and len(done.stage_times) == 2
    assert [u.tokens for u in done.updates] == [(null_tokens([5, 6], 1, model.vocab_size)[0],)]


# ---------------------------------------------------------------- real processes


def test_null_stage_workers_pipeline_two_streams_and_survive_a_bad_pass(tmp_path: Path,
                                                                         ) -> None:
    model = ModelConfig.preset("tiny-llama")
    half = model.num_layers // 2
    coord = FakeCoordinator(tmp_path, model.to_dict(), [(0, half), (half, model.num_layers)],
                            [1, 1])
    procs = [spawn(coord, tmp_path, s, ["--null-model", "--decode-cost-ms", "2"])
             for s in (0, 1)]
    try:
        coord.start(timeout_s=60)
        work = {0: [([5, 6, 7], 5), ([9], 2)], 1: [([4] * 20, 3)]}
        streams = {s: _requests(w, f"s{s}-") for s, w in work.items()}
        out = generate(coord, streams, timeout_s=30)
        for s, w in work.items():
            for req, (prompt, n) in zip(streams[s], w, strict=True):
                assert out[req.req_id] == null_tokens(prompt, n, model.vocab_size)
        bad = _requests([([5, model.vocab_size + 3], 4)], "bad")
        coord.pass_(P.StagePass(pass_id=500, stream=0, kind="encode", req_ids=("bad0",),
                                requests=tuple(bad)))
        (err,) = coord.wait_done(1, timeout_s=30)
        assert err.pass_id == 500 and err.worker_id == "st0r0"
        assert err.error is not None and "outside the vocabulary" in err.error
        again = generate(coord, {0: _requests([([7, 7], 3)], "ok")}, timeout_s=30)
        assert again == {"ok0": null_tokens([7, 7], 3, model.vocab_size)}
    finally:
        stop(coord, procs, tmp_path)


def test_engine_stage_workers_with_a_tp2_stage_match_transformers(
        llama: tuple[Path, ModelSpec], tmp_path: Path) -> None:
    import socket

    path, spec = llama
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        init = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    coord = FakeCoordinator(tmp_path, spec.config.to_dict(), [(0, 1), (1, 2)], [2, 1])
    model = ["--model", str(path), "--dtype", "float32"]
    procs = [spawn(coord, tmp_path, 0, model, (r, 2, init)) for r in (0, 1)]
    procs.append(spawn(coord, tmp_path, 1, model))
    try:
        coord.start(timeout_s=120)
        work = workload(128, 6, seed=9)
        reqs = _requests(work, "r")
        out = generate(coord, {0: reqs[:3], 1: reqs[3:]}, timeout_s=60)
        assert [out[r.req_id] for r in reqs] == hf_greedy(path, work)
        coord.pass_(P.StagePass(pass_id=900, stream=0, kind="decode", req_ids=("ghost",),
                                tokens=(5,)))
        (err,) = coord.wait_done(1, timeout_s=30)
        assert err.error is not None and "not running" in err.error
    finally:
        stop(coord, procs, tmp_path)
