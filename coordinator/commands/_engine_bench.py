"""Measurements behind `exegpt bench engine`: decode steps of our engine and of transformers on
the same weights, plus this machine's copy bandwidth and bf16 matmul peak (all in one run).

Each system runs ``repeats`` times after one warm-up (the systems alternate repeat by repeat):
prefill ``batch`` random prompts of ``prompt_len`` tokens, then time ``steps`` greedy decode
steps one by one. A repeat's step time
is its mean; the reported step time is the median over repeats (the machine may be shared).
The reference is ``LlamaForCausalLM`` (eager PyTorch, its default attention) with a real KV
cache: a manual ``past_key_values`` loop, the same loop ``model.generate`` runs.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from common.models.config import ModelConfig


@dataclass(frozen=True)
class DecodeTiming:
    """One system at one batch size."""

    system: str
    batch: int
    ms_per_step: float  # median over repeats of the repeat's mean step time
    step_ms_repeats: tuple[float, ...]
    prefill_ms: float  # median over repeats

    @property
    def tokens_per_s(self) -> float:
        return self.batch * 1000.0 / self.ms_per_step


def make_prompts(cfg: ModelConfig, batch: int, length: int, seed: int) -> list[list[int]]:
    """Distinct random prompts (ids >= 3 so no prompt contains a special token)."""
    gen = torch.Generator().manual_seed(seed)
    low = min(3, cfg.vocab_size - 1)
    return torch.randint(low, cfg.vocab_size, (batch, length), generator=gen).tolist()


def _timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


class EngineDecoder:
    """Our engine through its generation pipeline (stage + sampler), greedy, never stopping."""

    system = "exegpt"

    def __init__(self, spec: Any, dtype: str) -> None:
        from common.engine.pipeline import LocalPipeline
        from common.models.registry import build_stage

        self.pipe = LocalPipeline(build_stage(spec.config, weights=spec.weights, dtype=dtype))
        self._run = 0
        self.generated: list[list[int]] = []  # last run's greedy tokens, per prompt

    def run(self, prompts: list[list[int]], steps: int) -> tuple[float, list[float]]:
        from common.engine.batch import StageBatch
        from common.engine.sampling import SamplingParams

        self._run += 1
        req_ids = [f"bench{self._run}-{i}" for i in range(len(prompts))]
        params = SamplingParams(max_new_tokens=steps + 1, ignore_eos=True)
        for r in req_ids:
            self.pipe.sampler.add(r, params)
        batch = StageBatch.from_prompts(req_ids, prompts, self.pipe.device)
        tokens, prefill = _timed(lambda: self.pipe.encode(batch))
        self.generated = [[t] for t in tokens]
        times = []
        for _ in range(steps):
            order = self.pipe.order()
            by_req = dict(zip(req_ids, tokens, strict=True))
            step = StageBatch.from_tokens(order, [by_req[r] for r in order], self.pipe.device)
            new, seconds = _timed(lambda step=step: self.pipe.decode(step))
            tokens = [dict(zip(order, new, strict=True))[r] for r in req_ids]
            times.append(seconds)
            for seq, tok in zip(self.generated, tokens, strict=True):
                seq.append(tok)
        for r in req_ids:
            self.pipe.free(r)
        return prefill, times


def hf_llama_config(cfg: ModelConfig) -> Any:
    import transformers

    if cfg.family != "llama":
        raise ValueError(f"the transformers reference is built for llama-family models, "
                         f"not {cfg.family!r}; use --no-reference")
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=cfg.attention_bias, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)


class TransformersDecoder:
    """transformers' LlamaForCausalLM with the same weights and dtype, KV cache on."""

    system = "transformers"

    def __init__(self, spec: Any, dtype: str) -> None:
        import transformers

        torch_dtype = getattr(torch, dtype)
        model = transformers.LlamaForCausalLM(hf_llama_config(spec.config))
        state = {name: spec.weights.get(name) for name in spec.weights.names()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        allowed = {"lm_head.weight"} if spec.config.tie_embeddings else set()
        if set(missing) - allowed or unexpected:
            raise ValueError(f"weights do not fit LlamaForCausalLM: missing {missing}, "
                             f"unexpected {unexpected}")
        self.model = model.to(torch_dtype).eval()
        self.generated: list[list[int]] = []

    @torch.inference_mode()
    def run(self, prompts: list[list[int]], steps: int) -> tuple[float, list[float]]:
        ids = torch.tensor(prompts, dtype=torch.long)
        out, prefill = _timed(lambda: self.model(input_ids=ids, use_cache=True))
        past, tokens = out.past_key_values, out.logits[:, -1].argmax(-1)
        history = [tokens]
        times = []
        for _ in range(steps):
            out, seconds = _timed(lambda tokens=tokens, past=past: self.model(
                input_ids=tokens[:, None], past_key_values=past, use_cache=True))
            past, tokens = out.past_key_values, out.logits[:, -1].argmax(-1)
            times.append(seconds)
            history.append(tokens)
        self.generated = torch.stack(history, dim=1).tolist()
        return prefill, times


def time_decoders(decoders: list[Any], prompts: list[list[int]], steps: int, repeats: int,
                  warmup_steps: int) -> dict[str, DecodeTiming]:
    """Warm every system up, then alternate them repeat by repeat, so a burst of load from
    other processes on a shared machine hits both systems rather than one."""
    for decoder in decoders:
        decoder.run(prompts, warmup_steps)  # warm-up: allocator, oneDNN primitive caches
    prefills: dict[str, list[float]] = {d.system: [] for d in decoders}
    means: dict[str, list[float]] = {d.system: [] for d in decoders}
    for _ in range(repeats):
        for decoder in decoders:
            prefill, times = decoder.run(prompts, steps)
            prefills[decoder.system].append(prefill * 1000.0)
            means[decoder.system].append(1000.0 * sum(times) / len(times))
    return {name: DecodeTiming(system=name, batch=len(prompts),
                               ms_per_step=statistics.median(means[name]),
                               step_ms_repeats=tuple(means[name]),
                               prefill_ms=statistics.median(prefills[name]))
            for name in means}


def copy_bandwidth(num_bytes: int = 512 << 20, repeats: int = 5) -> float:
    """Read+write bytes per second of a large tensor copy (what a decode step streams)."""
    src = torch.ones(num_bytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [_timed(lambda: dst.copy_(src))[1] for _ in range(repeats)]
    return 2.0 * num_bytes / statistics.median(times)


def matmul_peak(dtype: torch.dtype = torch.bfloat16, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul in ``dtype`` (the best this torch build reaches)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.matmul(a, b)
    times = [_timed(lambda: torch.matmul(a, b))[1] for _ in range(repeats)]
    return 2.0 * size**3 / min(times)


def step_bytes(cfg: ModelConfig, batch: int, context: float, dtype_bytes: int) -> tuple[int, int]:
    """(weight bytes, KV bytes) one decode step must read. A tied embedding is read whole once,
    as the LM head; an untied one only by the batch's rows (negligible)."""
    params = cfg.total_params()
    if not cfg.tie_embeddings:
        params -= cfg.vocab_size * cfg.hidden_size
    kv = batch * context * cfg.num_layers * cfg.kv_bytes_per_token_per_layer(dtype_bytes)
    return params * dtype_bytes, int(kv)


def step_flops(cfg: ModelConfig, batch: int, context: float) -> float:
    per_token = cfg.num_layers * cfg.flops_per_token_per_layer("decoder", int(context))
    return float(batch * (per_token + cfg.lm_head_flops_per_token()))


def hardware() -> dict[str, Any]:
    import os
    import platform

    model = platform.processor() or "unknown"
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": model, "logical_cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "mkldnn": torch.backends.mkldnn.is_available(),
            "python": platform.python_version(), "load_avg_1m_at_end": load}
