"""Generation in one call: encode the prompts, then decode until every request stops.

    generate(model, prompts, sampling, tp_size=1, num_stages=1)
      tp_size == num_stages == 1 -> LocalPipeline in this process
      otherwise                  -> run_spmd spawns tp_size * num_stages gloo ranks; every rank
                                    runs the same loop on a StagePipeline (activations sent
                                    stage to stage, the last stage's tp rank 0 samples and
                                    broadcasts the tokens so all ranks free/compact alike)

The loop (``run_generation``) frees a request's KV the moment it stops and compacts the cache so
the decode batch stays a contiguous run of slots. Encoder-decoder models (T5) use the same
``encode``/``decode`` stage interface; their ``encode`` returns the first token's logits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.engine.batch import StageBatch
from common.engine.pipeline import LocalPipeline, Pipeline, StagePipeline, load_kv, save_kv
from common.engine.sampling import FINISH_LENGTH, SamplingParams, finish_reason
from common.models.config import ModelConfig
from common.models.registry import ModelSpec, build_stage, load_model_spec


@dataclass(frozen=True)
class GenerationResult:
    token_ids: list[int]
    finish_reason: str
    num_prompt_tokens: int


@dataclass(frozen=True)
class GenerateJob:
    """One generation run as plain JSON data (what spawned ranks receive).

    ``kv_save_dir``: after the encode pass every rank writes its KV exports and the first tokens
    there; ``kv_load_dir``: skip the encode and import them instead (prefill on one TP layout,
    decode on another)."""

    model: str
    prompts: list[list[int]]
    sampling: list[SamplingParams]
    dtype: str = "bfloat16"
    seed: int = 0
    kv_save_dir: str | None = None
    kv_load_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["sampling"] = [asdict(s) for s in self.sampling]
        return data

    @staticmethod
    def from_json(data: dict[str, Any]) -> GenerateJob:
        params = [SamplingParams(**{**s, "stop_token_ids": tuple(s["stop_token_ids"])})
                  for s in data["sampling"]]
        return GenerateJob(**{**data, "sampling": params})


def _normalise_sampling(sampling: SamplingParams | list[SamplingParams],
                        num: int) -> list[SamplingParams]:
    if isinstance(sampling, SamplingParams):
        return [sampling] * num
    if len(sampling) != num:
        raise ValueError(f"got {len(sampling)} SamplingParams for {num} prompts")
    return list(sampling)


def check_prompts(prompts: list[list[int]], cfg: ModelConfig) -> None:
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {i} is empty")
        if len(prompt) > cfg.max_position:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens, longer than the model's "
                             f"context of {cfg.max_position}")
        bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids {bad[:5]} outside the vocabulary "
                             f"(size {cfg.vocab_size})")


def generate(model: str | Path | ModelSpec, prompts: list[list[int]],
             sampling: SamplingParams | list[SamplingParams] | None = None, *,
             tp_size: int = 1, num_stages: int = 1, dtype: str = "bfloat16",
             device: str = "cpu", seed: int = 0, kv_save_dir: str | None = None,
             kv_load_dir: str | None = None) -> list[GenerationResult]:
    """Generate for a batch of token-id prompts; see the module docstring and GenerateJob."""
    params = _normalise_sampling(sampling or SamplingParams(), len(prompts))
    if tp_size == 1 and num_stages == 1:
        spec = model if isinstance(model, ModelSpec) else load_model_spec(model, seed=seed)
        check_prompts(prompts, spec.config)
        stage = build_stage(spec.config, weights=spec.weights, dtype=dtype, device=device)
        return run_generation(LocalPipeline(stage), prompts, params, spec.config,
                              kv_save_dir=kv_save_dir, kv_load_dir=kv_load_dir)
    if isinstance(model, ModelSpec):
        raise ValueError("tp_size/num_stages > 1 spawn processes: pass the model path or preset "
                         "name instead of a loaded ModelSpec")
    job = GenerateJob(model=str(model), prompts=prompts, sampling=params, dtype=dtype, seed=seed,
                      kv_save_dir=kv_save_dir, kv_load_dir=kv_load_dir)
    return generate_many([job], tp_size=tp_size, num_stages=num_stages, device=device)[0]


def generate_many(jobs: list[GenerateJob], *, tp_size: int, num_stages: int,
                  device: str = "cpu") -> list[list[GenerationResult]]:
    """Run several jobs in one spawned process group (spawning torch processes is slow)."""
    from common.engine.dist import run_spmd

    payload = {"jobs": [j.to_json() for j in jobs], "tp_size": tp_size,
               "num_stages": num_stages, "device": device}
    per_rank = run_spmd("common.engine.generate:_spmd_main", payload, tp_size * num_stages)
    return [[GenerationResult(**r) for r in job] for job in per_rank[0]]


def _spmd_main(payload: dict[str, Any], rank: int, world_size: int) -> list[list[dict]]:
    from common.engine.dist import Topology, make_tp_groups

    topo = Topology(payload["tp_size"], payload["num_stages"], rank)
    tp = make_tp_groups(topo)
    outputs = []
    for data in payload["jobs"]:
        job = GenerateJob.from_json(data)
        spec = load_model_spec(job.model, seed=job.seed)
        check_prompts(job.prompts, spec.config)
        pipe = _stage_pipeline(spec, topo, tp, job.dtype, payload["device"])
        results = run_generation(pipe, job.prompts, job.sampling, spec.config,
                                 kv_save_dir=job.kv_save_dir, kv_load_dir=job.kv_load_dir,
                                 rank=rank)
        outputs.append([asdict(r) for r in results])
    return outputs


def _stage_pipeline(spec: ModelSpec, topo: Any, tp: Any, dtype: str, device: str) -> Pipeline:
    """This rank's stage, wrapped for the loop; encoder-decoder models need T5's driver (the
    encoder output travels back to every stage for its cross-attention K/V)."""
    from common.models.config import stage_layer_ranges

    cfg = spec.config
    if cfg.is_encoder_decoder:
        from common.models.t5_pipeline import make_stage_pipeline

        return make_stage_pipeline(cfg, spec.weights, topo, tp, dtype, device)
    layers = stage_layer_ranges(cfg.num_layers, topo.num_stages)[topo.stage]
    stage = build_stage(cfg, weights=spec.weights, layer_range=layers, tp=tp, dtype=dtype,
                        device=device)
    return StagePipeline(stage, topo, cfg.hidden_size)


def run_generation(pipe: Pipeline, prompts: list[list[int]], params: list[SamplingParams],
                   cfg: ModelConfig, *, kv_save_dir: str | None = None,
                   kv_load_dir: str | None = None, rank: int = 0) -> list[GenerationResult]:
    """The generation loop shared by every rank (all ranks take the same decisions)."""
    req_ids = [f"req-{i}" for i in range(len(prompts))]
    for r, p in zip(req_ids, params, strict=True):
        pipe.sampler.add(r, p)
    if kv_load_dir is not None:
        first = load_kv(pipe.cache, Path(kv_load_dir), req_ids)
    else:
        first = pipe.encode(StageBatch.from_prompts(req_ids, prompts, pipe.device))
    if kv_save_dir is not None:
        save_kv(pipe.cache, Path(kv_save_dir), req_ids, first, rank)
    outputs: dict[str, list[int]] = {r: [] for r in req_ids}
    reasons: dict[str, str] = {}
    lengths = dict(zip(req_ids, (len(p) for p in prompts), strict=True))
    tokens = dict(zip(req_ids, first, strict=True))
    while tokens:
        for r, tok in tokens.items():
            outputs[r].append(tok)
            reason = finish_reason(tok, len(outputs[r]), pipe.sampler.params(r),
                                   cfg.eos_token_ids)
            # T5's decoder length does not depend on its input length.
            used = len(outputs[r]) + (1 if cfg.is_encoder_decoder else lengths[r])
            if reason is None and used > cfg.max_position:
                reason = FINISH_LENGTH
            if reason is not None:
                reasons[r] = reason
                pipe.free(r)
        active = [r for r in pipe.order() if r not in reasons]
        if not active:
            break
        new = pipe.decode(StageBatch.from_tokens(active, [outputs[r][-1] for r in active],
                                                 pipe.device))
        tokens = dict(zip(active, new, strict=True))
    return [GenerationResult(token_ids=outputs[r], finish_reason=reasons[r],
                             num_prompt_tokens=lengths[r]) for r in req_ids]
