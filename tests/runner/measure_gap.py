"""Predicted vs measured on the real mesh (SmolLM2-135M bf16), decomposed per component.

    .venv/bin/python tests/runner/measure_gap.py PROFILE.json --policy waa --bound 10
    .venv/bin/python tests/runner/measure_gap.py PROFILE.json --policy rra --bound 15

Requests draw (input, output) lengths from the plan's own workload pmf and run with
``Sampling.ignore_eos`` so every request produces exactly its drawn output length (as the paper
forces lengths). All are submitted at once (saturated, like the plan). Reported:

- end to end: throughput over the makespan, the p99-length latency (encode start -> the
  s99-th token of requests at least that long), vs the plan;
- per pass, from the coordinator's per-token stamps: every decode step (tokens of one step
  share a stamp) with its batch and mean context, its wall time vs the cost model's time for
  that exact (batch, context); encode passes (encode start -> end) vs the model's encode time;
- CPU: each worker process's CPU seconds (/proc, user + system) over the run vs its busy wall
  time, i.e. how much of a pass's wall time was the process actually computing;
- the pass model the bench calibrates with (``coordinator/bench/calibrate.py``): least squares
  of every measured pass against ``c x profile compute + o x passes`` (``pass_fit``: decode
  messages and encode passes apart), and the plan re-simulated with the decode fit's (c, o)
  (``predicted_with_pass_fit``) beside the one-factor wall/CPU re-simulation (``contention``).
  For WAA a decode message is one decoder iteration (or k merged ones), so its fit is the
  WAA decode iteration's (c, o) directly; for pipeline plans the stamps interleave the
  streams and the decode fit is indicative only (the bench fits pipelines by TPOT).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from common import protocol as P
from common.client import AsyncClient
from common.models.gguf_loader import default_gguf_path
from coordinator.commands.serve import model_fields
from coordinator.launch import LaunchSpec, LocalMesh
from coordinator.plan_launch import plan_fields
from coordinator.planner.costs import Costs
from coordinator.planner.layout import Stage
from coordinator.planner.planning import make_plan
from coordinator.planner.profile import Profile
from coordinator.planner.workload import parse_workload

WORKLOAD = "in=normal:64,16,128;out=normal:32,8,64"  # SmolLM2-sized chat lengths for 2 cores


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a live process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


async def send_all(endpoint: str, work: list[tuple[int, int]], vocab: int
                   ) -> tuple[list[P.Result], float, dict[str, Any]]:
    rng = np.random.default_rng(1)
    async with AsyncClient(endpoint) as client:
        t0 = time.time()
        results = await asyncio.gather(*(client.generate(
            prompt_ids=[int(t) for t in rng.integers(100, vocab, i)], max_new_tokens=o,
            ignore_eos=True) for i, o in work))
        wall = time.time() - t0
        stats = (await client.stats()).stats
        return list(results), wall, stats


def decode_steps(results: list[P.Result], prompts: list[int]
                 ) -> list[tuple[float, int, int, float]]:
    """(stamp, steps, batch, mean context) per message of decode tokens: tokens after the
    first share the stamp of the DecodeTokens/PassDone that carried them; a decoder that
    merged k iterations into one message gives one request k tokens with that stamp."""
    ctx: dict[float, list[int]] = defaultdict(list)
    per_req: dict[float, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r, prompt in zip(results, prompts, strict=True):
        for k, t in enumerate(r.lifecycle.t_tokens[1:], start=1):
            ctx[t].append(prompt + k)
            per_req[t][r.req_id] += 1
    return sorted((t, max(per_req[t].values()), len(per_req[t]), float(np.mean(c)))
                  for t, c in ctx.items())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("profile", type=Path)
    parser.add_argument("--policy", default="waa")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--bound", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    profile = Profile.load(args.profile)
    workload = parse_workload(WORKLOAD)
    plan = make_plan(workload, profile, args.workers, args.bound, policy=args.policy)
    ins, outs = workload.sample(np.random.default_rng(0), args.requests)
    work = [(int(i), int(o)) for i, o in zip(ins, outs, strict=True)]
    s99 = int(plan.workload_info["p99_output"])
    for k in (3, 2, 1):  # p99-length probes (SLA-(b)) at 1/4, 1/2, 3/4 of the submissions
        work.insert(k * len(work) // 4, (int(ins[k]), s99))
    model = model_fields(str(default_gguf_path()))
    spec = LaunchSpec(**model, **plan_fields(plan, null_model=False, decoder_capacity=256),
                      dtype="bfloat16", runs_path=Path("/tmp/runner-measure"))
    mesh = LocalMesh(spec, startup_timeout_s=300)
    endpoint = mesh.start()
    vocab = model["model_config"]["vocab_size"]
    try:
        asyncio.run(send_all(endpoint, [(8, 2)] * 2, vocab))
        pids = {c.name: c.popen.pid for c in mesh.children}
        cpu0 = {n: cpu_seconds(p) for n, p in pids.items()}
        load0 = load_average()
        results, wall, stats = asyncio.run(send_all(endpoint, work, vocab))
        cpu = {n: round(cpu_seconds(p) - cpu0[n], 2) for n, p in pids.items()}
        load1 = load_average()
    finally:
        mesh.stop(grace_s=30)
    report = summarise(plan, profile, work, results, wall, stats)
    report["cpu_s_per_process"] = cpu
    report["load_average"] = [load0, load1]
    report["contention"] = contention(plan, profile, workload, report, cpu)
    report["predicted_with_pass_fit"] = with_pass_fit(plan, profile, workload,
                                                      report["pass_fit"]["decode"])
    print(json.dumps(report, indent=1))


def affine(pred: list[float], meas: list[float], passes: list[float]) -> dict[str, Any]:
    """Least squares ``meas = c * pred + o * passes`` (None when fewer than 3 passes)."""
    if len(pred) < 3:
        return {"c": None, "o_ms": None, "n": len(pred)}
    a = np.stack([np.asarray(pred), np.asarray(passes, np.float64)], axis=1)
    (c, o), *_ = np.linalg.lstsq(a, np.asarray(meas), rcond=None)
    fitted = a @ np.array([c, o])
    return {"c": round(float(c), 3), "o_ms": round(float(o) * 1e3, 2), "n": len(pred),
            "residual_rms_pct": round(float(np.sqrt(np.mean((np.asarray(meas) / fitted - 1)
                                                            ** 2))) * 100, 1)}


def with_pass_fit(plan: Any, profile: Profile, workload: Any, fit: dict[str, Any]
                  ) -> dict[str, Any] | None:
    """The plan re-simulated with compute x c + o per stage pass (the bench's calibration)."""
    from coordinator.bench.calibrate import PassFit, calibrated_profile
    from coordinator.planner.candidate import Candidate
    from coordinator.planner.simulator import simulate

    if fit["c"] is None or fit["c"] <= 0 or fit["o_ms"] < 0:
        return None
    cal = calibrated_profile(profile, PassFit(fit["c"], fit["o_ms"] / 1e3, "measure_gap"),
                             "measure_gap decode passes")
    search = plan.search
    cand = Candidate(plan.policy, plan.num_workers, int(search.get("tp", 1)),
                     int(search.get("num_tp_workers", 0)), plan.B_E, plan.N_D or 1,
                     plan.B_m or 1)
    met = simulate(cand, workload, cal)
    return {"throughput_seq_s": round(met.throughput_seq_s, 3),
            "latency_p99len_s": round(met.latency_p99len_s, 2)}


def contention(plan: Any, profile: Profile, workload: Any, report: dict[str, Any],
               cpu: dict[str, float]) -> dict[str, Any]:
    """Busy wall seconds / CPU seconds of the compute processes (how much longer a pass took
    than the CPU it used), and the plan re-simulated with every profile time scaled by that
    factor: what the cost model predicts for this machine under this load."""
    from coordinator.bench.calibrate import scaled_profile
    from coordinator.planner.candidate import Candidate
    from coordinator.planner.simulator import simulate

    busy = report["busy_wall_s"]
    procs = {n: c for n, c in cpu.items() if n != "coordinator"}
    factors = {n: round(busy[i] / c, 2) for i, (n, c) in enumerate(procs.items()) if c > 0}
    factor = sum(busy) / sum(procs.values())
    search = plan.search
    cand = Candidate(plan.policy, plan.num_workers, int(search.get("tp", 1)),
                     int(search.get("num_tp_workers", 0)), plan.B_E, plan.N_D or 1,
                     plan.B_m or 1)
    met = simulate(cand, workload, scaled_profile(profile, factor, "measured wall/CPU"))
    same = simulate(cand, workload, profile)  # must reproduce the plan's prediction
    assert abs(same.throughput_seq_s / plan.predicted["throughput_seq_s"] - 1) < 1e-6
    return {"wall_over_cpu": factors, "overall": round(factor, 3),
            "predicted_at_load": {"throughput_seq_s": round(met.throughput_seq_s, 3),
                                  "latency_p99len_s": round(met.latency_p99len_s, 2)}}


def summarise(plan: Any, profile: Profile, work: list[tuple[int, int]],
              results: list[P.Result], wall: float, stats: dict[str, Any]) -> dict[str, Any]:
    costs = Costs(profile)
    m = profile.model
    s99 = int(plan.workload_info["p99_output"])
    prompts = [i for i, _o in work]
    lat99 = [r.lifecycle.t_tokens[s99 - 1] - r.lifecycle.t_encode_start for r in results
             if len(r.tokens) >= s99]
    full = Stage(tp=1, enc_layers=(0, 0), dec_layers=(0, m.num_layers), first=True, last=True)
    stages = [Stage(tp=g.tp_size, enc_layers=(0, 0), dec_layers=tuple(g.layer_range),
                    first=g.layer_range[0] == 0, last=g.layer_range[1] == m.num_layers)
              for g in plan.worker_groups if g.role == "pipeline"] or [full]
    steps = decode_steps(results, prompts)
    gaps = np.diff([t for t, *_ in steps])
    per_stage = np.array([[n * costs.decode_stage(st, float(b), c) for st in stages]
                          for _t, n, b, c in steps])
    pred = per_stage[1:].sum(axis=1)
    counts = [float(n) for _t, n, _b, _c in steps[1:]]
    batches: dict[float, list[int]] = defaultdict(list)
    for r, prompt in zip(results, prompts, strict=True):
        batches[r.lifecycle.t_encode_start].append(prompt)
    enc_meas, enc_stage = [], []
    starts = {r.lifecycle.t_encode_start: r for r in results}
    for t0, lens in batches.items():
        enc_meas.append(starts[t0].lifecycle.t_encode_end - t0)
        enc_stage.append([costs.encode_stage(st, float(len(lens)), float(np.mean(lens)),
                                             float(np.sqrt(np.mean(np.square(lens)))))
                          for st in stages])
    enc_pred = np.array(enc_stage).sum(axis=1)
    busy_pred = per_stage.sum(axis=0) + np.array(enc_stage).sum(axis=0)
    overall = stats.get("overall", {})
    stage_busy = overall.get("stage_busy_s") or []
    busy_wall = ([float(x) for x in stage_busy] if stage_busy
                 else [float(np.sum(enc_meas)), float(np.sum(gaps))])
    starts_sorted = sorted(r.lifecycle.t_encode_start for r in results)
    lo = starts_sorted[len(starts_sorted) // 5]
    hi = starts_sorted[-1]
    window = sum(lo <= t < hi for t in starts_sorted)
    probes = [r.lifecycle.t_tokens[-1] - r.lifecycle.t_encode_start
              for r, (_i, o) in zip(results, work, strict=True) if o == s99]
    hand = [r.lifecycle.t_kv_received - r.lifecycle.t_kv_sent for r in results
            if r.lifecycle.t_kv_received and r.lifecycle.t_kv_sent]
    ready = [r.lifecycle.t_kv_received or r.lifecycle.t_encode_end for r in results]
    wait = [r.lifecycle.t_tokens[1] - t for r, t in zip(results, ready, strict=True)
            if len(r.lifecycle.t_tokens) > 1]
    num_steps = sum(n for _t, n, _b, _c in steps[1:])
    return {
        "plan": {"policy": plan.policy, "B_E": plan.B_E, "N_D": plan.N_D,
                 "stages": [list(g.layer_range) for g in plan.worker_groups]},
        "predicted": {k: plan.predicted[k] for k in ("throughput_seq_s", "latency_p99len_s")},
        "measured": {"requests": len(results), "wall_s": round(wall, 2),
                     "throughput_seq_s": round(len(results) / wall, 3),
                     "mean_output": statistics.mean(len(r.tokens) for r in results),
                     "mean_input": statistics.mean(i for i, _o in work),
                     "steady_throughput_seq_s": round(window / (hi - lo), 3),
                     "latency_p99len_probes_s": [round(x, 2) for x in probes],
                     "latency_p99len_all_n": len(lat99),
                     "handoff_mean_ms": round(float(np.mean(hand)) * 1e3, 1) if hand else None,
                     "ready_to_2nd_token_mean_ms": round(float(np.mean(wait)) * 1e3, 1)},
        "decode_steps": {"n": len(gaps), "mean_batch": round(float(np.mean(
            [b for _t, _n, b, _c in steps[1:]])), 1),
            "steps": num_steps,
            "measured_wall_per_step_ms": round(float(np.sum(gaps)) / num_steps * 1e3, 1),
            "predicted_per_step_ms": round(float(np.sum(pred)) / num_steps * 1e3, 1),
            "ratio_sum": round(float(np.sum(gaps) / np.sum(pred)), 3)},
        "encode_passes": {"n": len(enc_meas), "measured_mean_ms": round(
            float(np.mean(enc_meas)) * 1e3, 1), "predicted_mean_ms": round(
            float(np.mean(enc_pred)) * 1e3, 1),
            "ratio_sum": round(float(np.sum(enc_meas) / np.sum(enc_pred)), 3),
            "batches": [[round(t0 - starts_sorted[0], 1),
                         round(starts[t0].lifecycle.t_encode_end - starts_sorted[0], 1),
                         len(lens)] for t0, lens in sorted(batches.items())]},
        "pass_fit": {"decode": affine(list(pred), list(gaps), counts),
                     "encode": affine(list(enc_pred), enc_meas, [len(stages)] * len(enc_meas))},
        "busy_wall_s": [round(x, 2) for x in busy_wall],
        "stage_busy_predicted_s": [round(float(x), 2) for x in busy_pred],
    }


if __name__ == "__main__":
    main()
