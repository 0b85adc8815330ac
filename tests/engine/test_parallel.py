"""Tensor parallelism (tp 2), 2 pipeline stages, and KV re-sharding, against transformers.

Spawning torch processes costs seconds, so each layout is spawned once per module and runs
every model's job in that one process group (``generate_many``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from common.engine.generate import GenerateJob, generate, generate_many
from common.engine.sampling import SamplingParams

_spec = importlib.util.spec_from_file_location("tiny_hf", Path(__file__).with_name("tiny_hf.py"))
assert _spec is not None and _spec.loader is not None
tiny_hf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny_hf)

PARAMS = [SamplingParams(max_new_tokens=n) for n in tiny_hf.MAX_NEW]
# name -> (family, overrides); "mqa" has 1 KV head, so tp 2 replicates it on both ranks
MODELS = {"llama": ("llama", {}), "opt": ("opt", {}), "gpt2": ("gpt2", {}),
          "mqa": ("llama", {"num_key_value_heads": 1, "tie_word_embeddings": True})}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, list[list[int]]]]:
    torch.set_num_threads(1)
    out = {}
    for name, (family, overrides) in MODELS.items():
        model = tiny_hf.hf_model(family, **overrides)
        directory = tiny_hf.save(model, tmp_path_factory.mktemp(name))
        out[name] = (str(directory), tiny_hf.greedy_reference(model, tiny_hf.PROMPTS,
                                                              tiny_hf.MAX_NEW))
    return out


def _job(path: str, **kw: str) -> GenerateJob:
    return GenerateJob(model=path, prompts=tiny_hf.PROMPTS, sampling=PARAMS, dtype="float32",
                       **kw)


@pytest.fixture(scope="module")
def kv_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {k: str(tmp_path_factory.mktemp(k)) for k in ("from_tp1", "from_tp2")}


@pytest.fixture(scope="module")
def tp1_encoded(models, kv_dirs) -> list[list[int]]:
    """Prefill at tp 1 and save the KV (the tp 2 group then imports it)."""
    results = generate(models["llama"][0], tiny_hf.PROMPTS, PARAMS, dtype="float32",
                       kv_save_dir=kv_dirs["from_tp1"])
    return [r.token_ids for r in results]


@pytest.fixture(scope="module")
def tp2_results(models, kv_dirs, tp1_encoded) -> dict[str, list[list[int]]]:
    names = list(MODELS)
    jobs = [_job(models[n][0]) for n in names]
    jobs.append(_job(models["llama"][0], kv_save_dir=kv_dirs["from_tp2"]))
    jobs.append(_job(models["llama"][0], kv_load_dir=kv_dirs["from_tp1"]))
    jobs.append(GenerateJob(model=models["llama"][0], prompts=tiny_hf.PROMPTS, sampling=PARAMS,
                            dtype="bfloat16"))
    out = generate_many(jobs, tp_size=2, num_stages=1)
    tokens = [[r.token_ids for r in job] for job in out]
    return dict(zip([*names, "save", "load", "bf16"], tokens, strict=True))


@pytest.fixture(scope="module")
def pp2_results(models) -> dict[str, list[list[int]]]:
    names = ["llama", "opt", "gpt2"]
    out = generate_many([_job(models[n][0]) for n in names], tp_size=1, num_stages=2)
    return {n: [r.token_ids for r in job] for n, job in zip(names, out, strict=True)}


@pytest.mark.parametrize("name", list(MODELS))
def test_tp2_matches_transformers(models, tp2_results, name: str) -> None:
    assert tp2_results[name] == models[name][1]


@pytest.mark.parametrize("name", ["llama", "opt", "gpt2"])
def test_two_stages_match_transformers(models, pp2_results, name: str) -> None:
    assert pp2_results[name] == models[name][1]


def test_kv_resharding_tp1_to_tp2(models, tp1_encoded, tp2_results) -> None:
    assert tp1_encoded == models["llama"][1]
    assert tp2_results["load"] == models["llama"][1]


def test_kv_resharding_tp2_to_tp1(models, kv_dirs, tp2_results) -> None:
    assert tp2_results["save"] == models["llama"][1]
    assert len(list(Path(kv_dirs["from_tp2"]).glob("req-0.rank*.safetensors"))) == 2
    results = generate(models["llama"][0], tiny_hf.PROMPTS, PARAMS, dtype="float32",
                       kv_load_dir=kv_dirs["from_tp2"])
    assert [r.token_ids for r in results] == models["llama"][1]


def test_tp2_bfloat16_runs_and_agrees_on_the_first_tokens(models, tp2_results) -> None:
    """bf16 all-reduces go through float32 on gloo; the wide tiny model keeps the first
    greedy token of every prompt equal to the float32 reference."""
    got, ref = tp2_results["bf16"], models["llama"][1]
    assert [len(t) for t in got] == [len(t) for t in ref]
    assert [t[0] for t in got] == [t[0] for t in ref]


@pytest.mark.slow
def test_tp2_times_two_stages(models) -> None:
    out = generate_many([_job(models[n][0]) for n in ("llama", "gpt2")], tp_size=2,
                        num_stages=2)
    assert [[r.token_ids for r in job] for job in out] == [models["llama"][1], models["gpt2"][1]]
