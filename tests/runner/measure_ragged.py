"""Ragged encode passes in process: thread CPU time of one whole-model encode of ``B`` prompts
with lengths drawn from a workload (default S/4: normal(64, 63) clipped to 1..128, packed, no
padding), next to the cost model's compute for that exact batch (``Costs.encode_stage`` with the
batch's mean and RMS length, no mesh overhead: what ``calibrate.encode_passes`` predicts).

Why a drift reference: thread CPU time on this shared 2-vCPU VM is not contention-free (the
4 linears of one SmolLM2 layer at 2048 rows took 192 ms of CPU at load ~0.5, 209 ms at load
~3). Each repeat therefore also times a one-layer on-grid pass (``B`` prompts of
``--ref-len`` tokens, a profiled cell) against the profile's row for it: ``ref_ratio`` is how
fast the machine runs right now relative to when it was profiled, and ``drift_free`` =
``cpu_over_pred / ref_ratio`` is the cost model's own error for the ragged batch (its token
interpolation and ragged-attention term), the part a profile or cost-model change can fix.

    .venv/bin/python tests/runner/measure_ragged.py PROFILE.json [--batches 8 16 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from common.engine.batch import StageBatch
from common.models.registry import build_stage
from coordinator.planner.costs import Costs
from coordinator.planner.layout import Stage
from coordinator.planner.profile import Profile
from coordinator.planner.workload import parse_workload

S4 = "in=normal:64,63,128;out=normal:32,13,80"


def encoder(stage: torch.nn.Module, lengths: list[int]) -> Callable[[], float]:
    """A callable running one encode of fresh requests; returns its thread CPU seconds."""
    count = [0]
    prompts = [[100 + (i + j) % 1000 for j in range(n)] for i, n in enumerate(lengths)]

    def run() -> float:
        ids = [f"r{count[0]}_{i}" for i in range(len(lengths))]
        count[0] += 1
        batch = StageBatch.from_prompts(ids, prompts)
        t0 = time.thread_time()
        stage.encode(batch)  # type: ignore[operator]
        spent = time.thread_time() - t0
        for r in ids:
            stage.cache.free(r)  # type: ignore[union-attr]
        return spent
    return run


def one_layer_pred(profile: Profile, batch: int, length: int) -> float:
    """The profile's compute of the one-layer reference pass (embedding + one layer)."""
    tokens = float(batch * length)
    return float(profile.attn("enc", 1, batch, float(length)) + profile.rest("enc", 1, tokens)
                 + profile.op("embed", 1, tokens))


def measure(profile: Profile, batch: int, lengths: list[int], whole_stage: torch.nn.Module,
            ref_stage: torch.nn.Module, ref_len: int, repeats: int) -> dict[str, object]:
    costs = Costs(profile)
    model = profile.model
    whole = Stage(tp=1, enc_layers=(0, 0), dec_layers=(0, model.num_layers), first=True,
                  last=True)
    lens = np.array(lengths, np.float64)
    mean, rms = float(lens.mean()), float(np.sqrt((lens ** 2).mean()))
    pred = float(costs.encode_stage(whole, float(batch), mean, rms, None))
    ragged, ref = encoder(whole_stage, lengths), encoder(ref_stage, [ref_len] * batch)
    ragged(), ref()  # warm-up: first pass of a shape
    cpu, ref_cpu = [], []
    for _ in range(repeats):  # interleaved: both see the same machine state
        cpu.append(ragged())
        ref_cpu.append(ref())
    c, rc = statistics.median(cpu), statistics.median(ref_cpu)
    ref_ratio = rc / one_layer_pred(profile, batch, ref_len)
    return {"batch": batch, "tokens": int(lens.sum()), "mean_len": round(mean, 1),
            "rms_len": round(rms, 1), "predicted_ms": round(pred * 1e3, 1),
            "cpu_ms": round(c * 1e3, 1), "cpu_over_pred": round(c / pred, 3),
            "ref_ratio": round(ref_ratio, 3), "drift_free": round(c / pred / ref_ratio, 3),
            "cpu_all_ms": [round(x * 1e3) for x in cpu],
            "load_1min": float(Path("/proc/loadavg").read_text().split()[0])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("profile", type=Path)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workload", default=S4)
    parser.add_argument("--ref-len", type=int, default=64, help="an enc_seqs grid length")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    profile = Profile.load(args.profile)
    model = profile.model
    whole_stage = build_stage(model, dtype=profile.meta["dtype"], device="cpu")
    ref_stage = build_stage(model, dtype=profile.meta["dtype"], device="cpu", layer_range=(0, 1))
    workload = parse_workload(args.workload)
    rng = np.random.default_rng(args.seed)
    for batch in args.batches:
        lengths = [int(x) for x in workload.input.sample(rng, batch)]
        row = measure(profile, batch, lengths, whole_stage, ref_stage, args.ref_len,
                      args.repeats)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
