"""Where a decode step's time goes (not a test): per-component CPU time of our engine.

    .venv/bin/python tests/engine/profile_decode.py [batch=32] [steps=24] [unfused]

SmolLM2-135M (GGUF) bf16, 128-token random prompts, one torch thread, thread CPU time (on a
shared machine wall time includes other processes; CPU time does not). Each kernel entry point
of ``common.engine.native`` and the main modules are wrapped with timers; the fused one-call
layer (``native_layer``) hides its parts, so ``unfused`` runs the module path for a breakdown.
"""

from __future__ import annotations

import collections
import functools
import sys
import time
from typing import Any

import torch

torch.set_num_threads(1)

totals: dict[str, float] = collections.defaultdict(float)
calls: collections.Counter[str] = collections.Counter()


def _wrap(owner: Any, name: str, label: str) -> None:
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.thread_time()
        out = fn(*args, **kwargs)
        totals[label] += time.thread_time() - start
        calls[label] += 1
        return out

    setattr(owner, name, timed)


def main() -> None:
    from common.engine import native, native_layer
    from common.engine import tp as tp_mod
    from common.engine.batch import StageBatch
    from common.engine.pipeline import LocalPipeline
    from common.engine.sampling import SamplingParams
    from common.models import layers
    from common.models.registry import build_stage, load_model_spec

    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 24
    if "unfused" in sys.argv[3:]:
        layers.DecoderLayer.step_plan = lambda self, ctx: None  # type: ignore[method-assign]
    for name in ("linear", "decode_attention", "rms_norm", "rope_", "swiglu", "argmax"):
        _wrap(native, name, f"kernel {name}")
    _wrap(native_layer.StepPlan, "run_layer", "fused layer (one C call)")
    _wrap(layers.Attention, "forward", "attention block (module path)")
    _wrap(layers.MLP, "forward", "MLP block (module path)")
    _wrap(tp_mod.ParallelLMHead, "forward", "LM head")
    _wrap(LocalPipeline, "decode", "decode step")
    spec = load_model_spec("smollm2-135m")
    pipe = LocalPipeline(build_stage(spec.config, weights=spec.weights, dtype="bfloat16"))
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, spec.config.vocab_size, (batch, 128), generator=gen).tolist()
    ids = [f"r{i}" for i in range(batch)]
    for r in ids:
        pipe.sampler.add(r, SamplingParams(max_new_tokens=steps + 8, ignore_eos=True))
    tokens = pipe.encode(StageBatch.from_prompts(ids, prompts))
    for timed_steps in (4, steps):  # warm-up, then the measured steps
        totals.clear()
        calls.clear()
        for _ in range(timed_steps):
            tokens = pipe.decode(StageBatch.from_tokens(pipe.order(), tokens))
    step = totals["decode step"]
    print(f"batch {batch}, {steps} steps, CPU ms per step (1 thread):")
    for label, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {label:32s} {1e3 * seconds / steps:8.2f}  {100 * seconds / step:5.1f}%"
              f"  calls/step {calls[label] / steps:.0f}")


if __name__ == "__main__":
    main()
