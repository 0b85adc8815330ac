"""Throughput alone, for the search's bounds: ``simulate(cand).throughput_seq_s``, bit for bit,
without the latency and memory parts.

Branch and bound costs a box's f-maximising corner only to learn its upper bound; whether that
corner meets the bound is asked later, and only for boxes that reach the top of the heap. RRA
throughput needs the cycle (encode + alive-only decode steps) but not the p99 request's own
steps nor the memory; WAA throughput is ``B_E / max(encoder period, decoder round)`` and needs
neither the handoff, the encoder-bound fixed point (a root-finding) nor the memory.
"""

from __future__ import annotations

import numpy as np

from coordinator.planner.candidate import Candidate, WorkloadStats
from coordinator.planner.costs import Costs
from coordinator.planner.layout import Pipeline, build_pipeline, tp_stage_sizes
from coordinator.planner.rra_table import cycle_sums
from coordinator.planner.simulator import (
    _rra_cycle,
    expected_encode,
    rra_core,
    rra_cycle,
    simulate,
    waa_core,
    waa_pipelines,
)

Score = tuple[float, float, float, bool]  # (throughput f, constraint g, latency, fits memory)


def score(cand: Candidate, stats: WorkloadStats, costs: Costs, bound: float, sla: str) -> Score:
    """(f, g, latency, fits) as the search sees ``simulate(cand)``: f = throughput, g =
    max(latency / bound, peak memory / capacity), identical to computing them from the full
    metrics, without the per-worker utilisation and memory lists (RRA and WAA)."""
    if cand.policy == "rra":
        tps = tp_stage_sizes(cand.num_workers, cand.tp, cand.num_tp_workers)
        pipe = build_pipeline(costs.profile, tps, enc=True, dec=True)
        core = None if pipe is None else rra_core(cand, stats, costs, pipe, True)
    elif cand.policy.startswith("waa"):
        pipes = waa_pipelines(cand, stats, costs)
        core = None if pipes is None else waa_core(cand, stats, costs, pipes, True)
    else:
        m = simulate(cand, stats, costs)
        peak = max(m.worker_mem_bytes) if m.worker_mem_bytes else 0.0
        return _score(m.throughput_seq_s, m.latency(sla), peak, m.mem_capacity_bytes, bound,
                      m.feasible)
    if core is None:
        return 0.0, float("inf"), float("inf"), False
    peak = max(core.mem)
    return _score(core.x, core.lat, peak, costs.capacity, bound, peak <= costs.capacity)


def _score(x: float, lat: float, peak: float, capacity: float, bound: float, fits: bool
           ) -> Score:
    if x <= 0:
        return 0.0, float("inf"), lat, fits
    return x, max(lat / bound, peak / capacity), lat, fits


def rra_memory_floor(cand: Candidate, stats: WorkloadStats, costs: Costs) -> float:
    """Peak memory / capacity of an RRA candidate: g's memory term, the same number ``score``
    takes the maximum of, so g >= it exactly. It needs no profile lookup (the decode batch
    and context come from the length law alone), so memory-infeasible points cost nothing."""
    tps = tp_stage_sizes(cand.num_workers, cand.tp, cand.num_tp_workers)
    pipe = build_pipeline(costs.profile, tps, enc=True, dec=True)
    if pipe is None:
        return float("inf")
    batch, ctx = rra_cycle(cand, stats)
    peak_tokens = float(np.max(batch * ctx)) * len(pipe)
    peak = max(w + costs.kv_bytes_held(st, peak_tokens)
               for st, w in costs.weighted_stages(pipe, True))
    return peak / costs.capacity


def rra_fit_floor(cand: Candidate, stats: WorkloadStats, costs: Costs, nds: list[int]
                  ) -> float:
    """A lower bound of ``rra_memory_floor`` over every N_D in ``nds`` at ``cand``'s B_E and TP
    workers: the peak tokens are B_E x max_u(cycle sums x context), so the smallest such peak
    over N_D (computed once per workload) bounds them all; margin 1e-9 for rounding. The
    scheduler cuts each RRA grid to the B_E values at which some N_D can fit."""
    tps = tp_stage_sizes(cand.num_workers, cand.tp, cand.num_tp_workers)
    pipe = build_pipeline(costs.profile, tps, enc=True, dec=True)
    if pipe is None:
        return float("inf")
    cache = stats.__dict__.setdefault("_rra_min_peak", {})
    key = tuple(nds)
    if key not in cache:
        cache[key] = min(float(np.max(sums * ctx))
                         for sums, ctx in (cycle_sums(stats, n_d) for n_d in nds))
    tokens = cand.B_E * cache[key] * len(pipe) * (1.0 - 1e-9)
    peak = max(w + costs.kv_bytes_held(st, tokens)
               for st, w in costs.weighted_stages(pipe, True))
    return peak / costs.capacity


def waa_memory_floor(cand: Candidate, stats: WorkloadStats, costs: Costs) -> float:
    """A lower bound of a WAA candidate's peak memory / capacity (so of g) from its rates
    alone: encoders hold at least one batch's KV (in flight >= 1); a decoder-bound decoder
    holds B_E * E[S] sequences' KV, exactly as ``waa_core`` charges it; an encoder-bound one at
    least its weights (its batch is a fixed point not worth solving for a bound)."""
    rates = _waa_rates(cand, stats, costs)
    if rates is None:
        return float("inf")
    (enc_pipe, dec_pipe), e_period, rnd = rates
    peak = _encoder_floor(cand, stats, costs, enc_pipe)
    dec_stages = costs.weighted_stages(dec_pipe, True)
    if e_period <= rnd:
        tokens = cand.B_E * stats.mean_s * (stats.in_decode_weighted + stats.mean_age)
        peak = max(peak, max(w + costs.kv_bytes_held(st, tokens) for st, w in dec_stages))
    else:
        peak = max(peak, max(w for _, w in dec_stages))
    return peak / costs.capacity


def waa_split_floor(cand: Candidate, stats: WorkloadStats, costs: Costs) -> float:
    """A lower bound of g for every B_m at ``cand``'s B_E, TP workers and split (inf when the
    split cannot run): the scheduler cuts a whole group of WAA runs to the B_E values that can
    fit before costing any of them.

    Encoders hold one batch's KV (as in ``waa_memory_floor``). Decoders hold B_D sequences'
    KV: B_D = B_E E[S] when decoder-bound; encoder-bound, B_D solves B_D = x E[S] round(B_D)
    with x = B_E / encoder period, and a round is at least the sum of the stage times at the
    smallest batch (costs never fall with the batch), so B_D >= B_E E[S] T0 / period. The
    margins cover the root finder's tolerance."""
    pipes = waa_pipelines(cand, stats, costs)
    if pipes is None:
        return float("inf")
    enc_pipe, dec_pipe = pipes
    e_period = max(expected_encode(costs, enc_pipe, cand.B_E, stats, "waa_encode"))
    ctx = stats.in_decode_weighted + stats.mean_age
    t0 = sum(_stage_times(costs, dec_pipe, 1e-12, ctx, 1))
    b_d = cand.B_E * stats.mean_s * min(1.0, t0 / e_period * (1.0 - 1e-6))
    tokens = max(b_d - 1e-5, 0.0) * ctx
    peak = max(_encoder_floor(cand, stats, costs, enc_pipe),
               max(w + costs.kv_bytes_held(st, tokens)
                   for st, w in costs.weighted_stages(dec_pipe, True)))
    return peak / costs.capacity


def _encoder_floor(cand: Candidate, stats: WorkloadStats, costs: Costs, enc_pipe: Pipeline
                   ) -> float:
    """Peak bytes on an encoder worker holding one batch's KV (in flight >= 1)."""
    in_flight = 1.0 * cand.B_E * stats.mean_in
    return max(w + costs.encoder_kv_bytes(st, float(in_flight))
               for st, w in costs.weighted_stages(enc_pipe, True))


def _waa_rates(cand: Candidate, stats: WorkloadStats, costs: Costs
               ) -> tuple[tuple[Pipeline, Pipeline], float, float] | None:
    """(pipelines, encoder period, decoder round at B_D = B_E E[S]), as ``waa_core`` computes
    them; memoised (throughput and the memory floor both ask for the same candidates)."""
    cache = costs.__dict__.setdefault("_waa_rates", {})
    key = (cand, id(stats))
    if key not in cache:
        pipes = waa_pipelines(cand, stats, costs)
        rates = None
        if pipes is not None:
            e_period = max(expected_encode(costs, pipes[0], cand.B_E, stats, "waa_encode"))
            ctx = stats.in_decode_weighted + stats.mean_age
            stages = _stage_times(costs, pipes[1], cand.B_E * stats.mean_s, ctx, cand.B_m)
            flat = np.array(stages, np.float64)  # costs.round_time of floats, minus its checks
            rates = (pipes, e_period, float(np.maximum(flat.sum(), cand.B_m * flat.max())))
        cache[key] = (rates, stats)  # stats kept alive: its id stays valid
    return cache[key][0]


def throughput(cand: Candidate, stats: WorkloadStats, costs: Costs) -> float:
    """Sequences/s of ``cand`` (0.0 when it cannot run): the search's objective f."""
    if cand.policy == "rra":
        tps = tp_stage_sizes(cand.num_workers, cand.tp, cand.num_tp_workers)
        pipe = build_pipeline(costs.profile, tps, enc=True, dec=True)
        if pipe is None:
            return 0.0
        cycle = _rra_cycle(cand, stats, costs, pipe).cycle
        x = len(pipe) * cand.B_E / cycle
    elif cand.policy.startswith("waa"):
        rates = _waa_rates(cand, stats, costs)
        if rates is None:
            return 0.0
        _, e_period, rnd = rates
        x = cand.B_E / rnd if e_period <= rnd else cand.B_E / e_period
    else:
        x = simulate(cand, stats, costs).throughput_seq_s
    return x if x > 0 else 0.0


def waa_bound(cand: Candidate, max_micro: int, stats: WorkloadStats, costs: Costs) -> float:
    """An upper bound of ``throughput`` for every B_m <= ``max_micro`` at ``cand``'s B_E,
    TP workers and split: one value for a whole group of WAA runs, so that a group that
    cannot reach the incumbent is never costed run by run.

    Throughput is ``B_E / max(encoder period, decoder round)``; the round with m micro-batches
    is at least the sum of the stage times at batch B_D / m, which (costs never fall with the
    batch) is at least that sum at B_D / max_micro. The margin covers rounding."""
    pipes = waa_pipelines(cand, stats, costs)
    if pipes is None:
        return 0.0
    e_period = max(expected_encode(costs, pipes[0], cand.B_E, stats, "waa_encode"))
    ctx = stats.in_decode_weighted + stats.mean_age
    stages = _stage_times(costs, pipes[1], cand.B_E * stats.mean_s, ctx, max_micro)
    return cand.B_E / max(e_period, sum(stages)) * (1.0 + 1e-9)


def _stage_times(costs: Costs, pipe: Pipeline, b_d: float, ctx: float, num_micro: int
                 ) -> list[float]:
    """``simulator.waa_stage_times``, bit for bit, with each TP degree's per-layer cost and
    each op memoised per micro-batch size: WAA decoder pipelines of every split and TP-worker
    count share TP degrees, and B_E / B_m pairs with the same ratio share the micro-batch
    (on GPT-3 341B / 48 A40s 7,200 per-layer costings are 1,060 distinct)."""
    b = b_d / num_micro
    if b <= 0:
        return [0.0] * len(pipe)
    cache = costs.__dict__.setdefault("_waa_layer", {})
    key = (b, ctx)
    known = cache.get(key)
    if known is None:
        known = cache[key] = ({}, {})
    layers, ops = known
    p = costs.profile
    for tp, *_ in costs._distinct_stages(pipe)[0]:
        if tp not in layers:
            layers[tp] = costs._decode_layer(tp, b, ctx)
            for name in ("embed", "lm_head"):
                ops[name, tp] = p.op(name, tp, b)
    if ("stage_send", 1) not in ops:
        ops["stage_send", 1] = p.op("stage_send", 1, b * costs.hidden_bytes)
    return costs.per_stage(pipe, b, ctx, float, known, "waa_decode")
