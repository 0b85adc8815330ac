"""What the second lap of a T5 encode over pipeline stages costs: two stage backends of a
t5-small-shaped model (random weights) driven in process, each stage's compute time for lap 0
(encoder layers; the last stage also writes its cross K/V), lap 1 (stage 0: cross K/V from the
encoder output; both: the decoder start token, the last stage's LM head) and, for scale, one
decode pass. The planner's RRA encode cost models lap 0's encoder layers only.

    .venv/bin/python tests/runner/measure_t5_laps.py [--batch 8] [--length 64] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from common import protocol as P
from common.backend_stage_engine import EngineStageBackend
from common.models.config import ModelConfig
from common.models.registry import ModelSpec
from common.models.weights import RandomWeights

T5_SMALL = ModelConfig(family="t5", name="t5-small-shape", vocab_size=32128, hidden_size=512,
                       num_layers=6, num_encoder_layers=6, num_heads=8, head_dim=64,
                       ffn_size=2048, max_position=512, norm_eps=1e-6, activation="relu",
                       relative_attention_num_buckets=32, relative_attention_max_distance=128,
                       eos_token_id=1, pad_token_id=0)
PHASES = ("lap0 stage0", "lap0 stage1", "lap1 stage0", "lap1 stage1", "decode stage0",
          "decode stage1")


def _timed(stage: EngineStageBackend, sp: P.StagePass, out: dict[str, list[float]],
           key: str) -> object:
    start = time.perf_counter()
    result = stage.run(sp)
    out[key].append(time.perf_counter() - start)
    return result


def measure(batch: int, length: int, dtype: str, repeats: int) -> dict[str, float]:
    """Median seconds per phase (the first of ``repeats + 1`` rounds warms up)."""
    spec = ModelSpec(T5_SMALL, RandomWeights(T5_SMALL, seed=0), None)
    stages = [EngineStageBackend(spec, (0, 3), (0, 3), dtype, encoder_out_onward=False),
              EngineStageBackend(spec, (3, 6), (3, 6), dtype)]
    times: dict[str, list[float]] = {k: [] for k in PHASES}
    for it in range(repeats + 1):
        reqs = tuple(P.EncodeRequest(req_id=f"r{it}.{i}", prompt_ids=tuple(range(5, 5 + length)),
                                     max_new_tokens=4, sampling=P.Sampling(ignore_eos=True))
                     for i in range(batch))
        ids = tuple(r.req_id for r in reqs)
        sp = P.StagePass(pass_id=it, stream=0, kind="encode", req_ids=ids, requests=reqs)
        out = _timed(stages[0], sp, times, PHASES[0])
        out = _timed(stages[1], dataclasses.replace(sp, hidden=out.hidden), times, PHASES[1])
        sp = dataclasses.replace(sp, lap=1, encoder_out=out.encoder_out)
        out = _timed(stages[0], sp, times, PHASES[2])
        out = _timed(stages[1], dataclasses.replace(sp, hidden=out.hidden, encoder_out=None),
                     times, PHASES[3])
        dp = P.StagePass(pass_id=it, stream=0, kind="decode", req_ids=ids,
                         tokens=tuple(t.token for t in out.tokens))
        out = _timed(stages[0], dp, times, PHASES[4])
        _timed(stages[1], dataclasses.replace(dp, hidden=out.hidden), times, PHASES[5])
        for stage in stages:
            stage.drop(ids)
    return {k: statistics.median(v[1:]) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    med = measure(args.batch, args.length, args.dtype, args.repeats)
    print(f"batch {args.batch} x {args.length} tokens, {args.dtype}, median ms: "
          + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in med.items()))
    lap0, lap1 = med[PHASES[0]] + med[PHASES[1]], med[PHASES[2]] + med[PHASES[3]]
    dec = med[PHASES[4]] + med[PHASES[5]]
    hop = args.batch * args.length * T5_SMALL.hidden_size * (2 if "16" in args.dtype else 4)
    print(f"lap 0 {lap0 * 1e3:.1f} ms, lap 1 {lap1 * 1e3:.1f} ms (+{lap1 / lap0:.0%} of lap 0; "
          f"one decode pass {dec * 1e3:.1f} ms); encoder output sent back: {hop / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
