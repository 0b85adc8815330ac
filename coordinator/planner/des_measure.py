"""Turn a finished discrete-event run into Metrics, over a steady-state window.

Saturated runs start empty and drain at the end, so only requests whose encode started in
[start of the 20th percentile request, last request's encode start) count: throughput is the
admission rate there, latencies are theirs. SLA-(b) is the mean latency of the window's
requests whose output length is the p99 length (widened by a token at a time until at least
20 such requests exist).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from coordinator.planner.candidate import Metrics

if TYPE_CHECKING:
    from coordinator.planner.des import DESResult, Sim

WARMUP = 0.2


def _window(sim: Sim) -> tuple[float, float, np.ndarray]:
    req = sim.req
    started = np.flatnonzero(~np.isnan(req.t_encode_start))
    order = started[np.argsort(req.t_encode_start[started], kind="stable")]
    lo = float(req.t_encode_start[order[int(WARMUP * order.size)]])
    hi = float(req.t_encode_start[order[-1]])
    if hi <= lo:
        raise ValueError("discrete-event run too short for a steady-state window; "
                         "simulate more requests")
    inside = order[(req.t_encode_start[order] >= lo) & (req.t_encode_start[order] < hi)]
    return lo, hi, inside


def _p99_length_latency(sim: Sim, idx: np.ndarray, latency: np.ndarray) -> float:
    s99 = sim.stats.s99
    out = sim.req.out_len[idx]
    for width in range(0, 64):
        pick = np.abs(out - s99) <= width
        if pick.sum() >= 20 or width == 63:
            # centre the sample on s99: the mean of a symmetric window is unbiased for a
            # latency that is locally linear in the length
            return float(latency[pick].mean()) if pick.any() else float("nan")
    return float("nan")


def measure(sim: Sim) -> DESResult:
    from coordinator.planner.des import DESResult

    req, closed = sim.req, sim.closed
    lo, hi, idx = _window(sim)
    idx = idx[~np.isnan(req.t_finish[idx])]
    span = hi - lo
    throughput = idx.size / span
    latency = req.t_finish[idx] - req.t_encode_start[idx]
    out = req.out_len[idx]
    multi = out > 1
    tpot = ((req.t_finish[idx] - req.t_first_token[idx])[multi] / (out[multi] - 1)).mean()
    makespan = float(np.nanmax(req.t_finish))
    util, busy = [], []
    for role, pipe in sim.pipes.items():
        for s, st in enumerate(pipe):
            u = sim.stage_busy.get((role, s), 0.0) / makespan
            util += [u] * st.tp
            busy += [sorted(sim.intervals.get((role, s), []))] * st.tp
    batches = [b for t, b in sim.batch_samples if lo <= t < hi]
    queueing = req.t_encode_start[idx] - req.t_arrival[idx]
    metrics = Metrics(
        feasible=closed.feasible, reason=closed.reason, throughput_seq_s=throughput,
        throughput_tok_s=float(out.sum()) / span,
        latency_p99len_s=_p99_length_latency(sim, idx, latency),
        latency_p99_s=float(np.quantile(latency, 0.99)),
        ttft_s=float((req.t_first_token[idx] - req.t_encode_start[idx]).mean()),
        tpot_s=float(tpot), B_D=float(np.mean(batches)) if batches else 0.0,
        worker_util=tuple(util), worker_mem_bytes=closed.worker_mem_bytes,
        mem_capacity_bytes=closed.mem_capacity_bytes, pipelines=closed.pipelines,
        extra={"queueing_mean_s": float(queueing.mean()),
               "e2e_p99_s": float(np.quantile(latency + queueing, 0.99)),
               "requests_measured": float(idx.size)},
    )
    return DESResult(metrics, req, busy, (lo, hi))
