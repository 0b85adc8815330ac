"""Per-pass check of the profile: one whole-model (or layer-range) pass of the engine timed in
this process at exact (kind, batch, length) points, in thread CPU time and in wall time, next to
what the planner's cost model predicts for the same point. Separates profile accuracy (CPU time
vs prediction) from CPU contention (wall vs CPU time) with no mesh, no scheduling.

    .venv/bin/python tests/runner/measure_passes.py PROFILE.json [--repeats 5]

Weights are random (the cost depends on shapes only, as in the profiler). Uniform prompt
lengths only; ``tests/runner/measure_ragged.py`` times ragged batches (workload-drawn lengths)
against an interleaved on-grid reference that cancels the machine's drift.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from common.engine.batch import StageBatch
from common.models.registry import build_stage
from coordinator.planner.costs import Costs
from coordinator.planner.layout import Stage
from coordinator.planner.profile import Profile

DECODE = ((2, 80), (8, 80), (17, 80), (32, 80), (64, 80))  # (batch, context)
ENCODE = ((2, 64), (8, 64), (28, 64))  # (batch, prompt length)


def _timed(fn: object, repeats: int) -> tuple[float, float]:
    """(median thread CPU seconds, median wall seconds) of ``fn()`` after one warm-up."""
    fn()  # type: ignore[operator]
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.thread_time(), time.perf_counter()
        fn()  # type: ignore[operator]
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(cpu), statistics.median(wall)


def decode_pass(stage: object, batch: int, context: int) -> object:
    ids = [f"d{i}" for i in range(batch)]
    for r in ids:
        stage.cache.add(r)  # type: ignore[attr-defined]
    tokens = StageBatch.from_tokens(ids, [1] * batch)

    def run() -> None:
        for r in ids:
            stage.cache.set_length(r, context - 1)  # type: ignore[attr-defined]
        stage.decode(tokens)  # type: ignore[attr-defined]
    return run, ids


def encode_pass(stage: object, batch: int, length: int) -> object:
    ids = [f"e{i}" for i in range(batch)]
    prompts = [[100 + (i + j) % 1000 for j in range(length)] for i in range(batch)]

    def run() -> None:
        for r in ids:
            stage.cache.add(r)  # type: ignore[attr-defined]
        stage.encode(StageBatch.from_prompts(ids, prompts))  # type: ignore[attr-defined]
        for r in ids:
            stage.cache.free(r)  # type: ignore[attr-defined]
    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("profile", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    profile = Profile.load(args.profile)
    costs = Costs(profile)
    model = profile.model
    stage = build_stage(model, dtype="bfloat16", device="cpu")
    whole = Stage(tp=1, enc_layers=(0, 0), dec_layers=(0, model.num_layers), first=True,
                  last=True)
    over = {(r["phase"], r["batch"], r["seq_len"]): r["time_s"]
            for r in profile.meta.get("pass_overhead", [])}
    rows = []
    for batch, ctx in DECODE:
        run, ids = decode_pass(stage, batch, ctx)
        cpu, wall = _timed(run, args.repeats)
        for r in ids:
            stage.cache.free(r)  # type: ignore[attr-defined]
        pred = costs.decode_stage(whole, float(batch), float(ctx))
        rows.append(_row("decode", batch, ctx, pred, _nearest(over, "decode", batch, ctx),
                         cpu, wall))
    for batch, length in ENCODE:
        cpu, wall = _timed(encode_pass(stage, batch, length), args.repeats)
        pred = costs.encode_stage(whole, float(batch), float(length), float(length))
        rows.append(_row("encode", batch, length, pred,
                         _nearest(over, "encode", batch, length), cpu, wall))
    print(json.dumps(rows, indent=1))


def _nearest(over: dict[tuple[str, int, int], float], phase: str, batch: int, n: int) -> float:
    keys = [k for k in over if k[0] == phase]
    if not keys:
        return 0.0
    key = min(keys, key=lambda k: (abs(k[1] - batch), abs(k[2] - n)))
    return over[key]


def _row(kind: str, batch: int, n: int, pred: float, overhead: float, cpu: float,
         wall: float) -> dict[str, object]:
    return {"kind": kind, "batch": batch, "len_or_ctx": n, "predicted_ms": round(pred * 1e3, 1),
            "pass_overhead_ms": round(overhead * 1e3, 2), "cpu_ms": round(cpu * 1e3, 1),
            "wall_ms": round(wall * 1e3, 1), "cpu_over_pred": round(cpu / pred, 3),
            "wall_over_cpu": round(wall / cpu, 3)}


if __name__ == "__main__":
    main()
