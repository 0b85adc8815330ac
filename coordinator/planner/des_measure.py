"""Turn a finished discrete-event run into Metrics, over a steady-state window.

Saturated runs start empty and drain at the end, so only requests whose encode started in a
steady-state window count (see _window): throughput is the admission rate there, latencies
are those of the window's requests that finished before the drain. SLA-(b) is the mean time
from encode start to the p99-length-th token over the window's requests that got that far
(about 1% of them): the moment a request of exactly that length would have finished.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from coordinator.planner.candidate import Metrics

if TYPE_CHECKING:
    from coordinator.planner.des import DESResult, Sim

WARMUP = 0.2


def _settled(sim: Sim, lo: float, hi: float, idx: np.ndarray) -> np.ndarray:
    """Requests of the window that finished before the drain begins (at ``hi`` no request is
    left to admit and batches shrink): those that started at least one longest steady-state
    latency (seen over the window's first half) before ``hi``."""
    req = sim.req
    first_half = idx[req.t_encode_start[idx] < (lo + hi) / 2]
    lat = req.t_finish[first_half] - req.t_encode_start[first_half]
    tail = float(np.nanmax(lat)) if first_half.size else 0.0
    settled = idx[req.t_encode_start[idx] <= hi - tail]
    if settled.size < 0.2 * idx.size:
        raise ValueError("discrete-event run too short: requests live longer than the steady "
                         "state lasts; simulate more requests")
    return settled


def _window(sim: Sim) -> tuple[float, float, np.ndarray]:
    """Steady state: after the first 20% of requests AND after the longest lifetime among
    them (the decode batch needs about one lifetime to fill); until the queue runs dry."""
    req = sim.req
    started = np.flatnonzero(~np.isnan(req.t_encode_start))
    order = started[np.argsort(req.t_encode_start[started], kind="stable")]
    early = order[: max(int(WARMUP * order.size), 1)]
    fill = float(np.nanmax(req.t_finish[early] - req.t_encode_start[early]))
    lo = max(float(req.t_encode_start[order[early.size]]),
             float(req.t_encode_start[order[0]]) + fill)
    hi = float(req.t_encode_start[order[-1]])
    if hi <= lo:
        raise ValueError("discrete-event run too short for a steady-state window; "
                         "simulate more requests")
    inside = order[(req.t_encode_start[order] >= lo) & (req.t_encode_start[order] < hi)]
    return lo, hi, inside


def _p99_length_latency(sim: Sim, idx: np.ndarray) -> float:
    """Mean time from encode start to the p99-length-th token, over the window's requests
    that produced that many tokens: exactly when a p99-length request would finish."""
    req = sim.req
    reached = idx[~np.isnan(req.t_p99_token[idx])]
    if reached.size == 0:
        return float("nan")
    return float((req.t_p99_token[reached] - req.t_encode_start[reached]).mean())


def measure(sim: Sim) -> DESResult:
    from coordinator.planner.des import DESResult

    req, closed = sim.req, sim.closed
    lo, hi, idx = _window(sim)
    span = hi - lo
    throughput = idx.size / span
    tokens = float(req.out_len[idx].sum()) / span
    idx = _settled(sim, lo, hi, idx[~np.isnan(req.t_finish[idx])])
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
        throughput_tok_s=tokens,
        latency_p99len_s=_p99_length_latency(sim, idx),
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
