"""Throughput alone, for the search's bounds: ``simulate(cand).throughput_seq_s``, bit for bit,
without the latency and memory parts.

Branch and bound costs a box's f-maximising corner only to learn its upper bound; whether that
corner meets the bound is asked later, and only for boxes that reach the top of the heap. RRA
throughput needs the cycle (encode + alive-only decode steps) but not the p99 request's own
steps nor the memory; WAA throughput is ``B_E / max(encoder period, decoder round)`` and needs
neither the handoff, the encoder-bound fixed point (a root-finding) nor the memory.
"""

from __future__ import annotations

from coordinator.planner.candidate import Candidate, WorkloadStats
from coordinator.planner.costs import Costs
from coordinator.planner.layout import build_pipeline, tp_stage_sizes
from coordinator.planner.simulator import (
    _rra_cycle,
    expected_encode,
    simulate,
    waa_pipelines,
    waa_round,
)


def throughput(cand: Candidate, stats: WorkloadStats, costs: Costs) -> float:
    """Sequences/s of ``cand`` (0.0 when it cannot run): the search's objective f."""
    if cand.policy == "rra":
        tps = tp_stage_sizes(cand.num_workers, cand.tp, cand.num_tp_workers)
        pipe = build_pipeline(costs.profile, tps, enc=True, dec=True)
        if pipe is None:
            return 0.0
        cycle = _rra_cycle(cand, stats, costs, pipe)[-1]
        x = len(pipe) * cand.B_E / cycle
    elif cand.policy.startswith("waa"):
        pipes = waa_pipelines(cand, stats, costs)
        if pipes is None:
            return 0.0
        e_period = max(expected_encode(costs, pipes[0], cand.B_E, stats))
        ctx = stats.in_decode_weighted + stats.mean_age
        rnd = waa_round(costs, pipes[1], cand.B_E * stats.mean_s, ctx, cand.B_m)
        x = cand.B_E / rnd if e_period <= rnd else cand.B_E / e_period
    else:
        x = simulate(cand, stats, costs).throughput_seq_s
    return x if x > 0 else 0.0


def waa_encoder_bound(cand: Candidate, stats: WorkloadStats, costs: Costs) -> float:
    """``B_E / encoder period``: WAA throughput never exceeds it, whatever B_m (the decoder
    round only slows it down), so one value bounds every B_m of a (TP workers, split) run."""
    pipes = waa_pipelines(cand, stats, costs)
    if pipes is None:
        return 0.0
    return cand.B_E / max(expected_encode(costs, pipes[0], cand.B_E, stats))
