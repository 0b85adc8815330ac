"""XSimulator, closed form: expected batch of every step -> cycle time -> throughput, latency.

Saturated and offline, like the paper (arrivals are the discrete-event simulator's job).

- RRA: each of the P pipeline stages' micro-batches cycles "encode B_E, then N_D decode steps".
  At offset u of a cycle the expected batch is ``B_E * sum_c P(S >= c*N_D + u)``; at u = 1 that
  is Little's law, ``B_D = B_E * E[ceil(S/N_D)]``. A request of length s finishes at offset
  ``1 + (s-1) mod N_D`` of its ``ceil(s/N_D)``-th cycle.
- WAA: an encoder pipeline feeds a decoder pipeline (B_m micro-batches) one batch per round;
  ``B_D = B_E * E[S]`` when the decoder is the bottleneck, else the fixed point
  ``B_D = X * E[S] * round(B_D)`` at the encoder's rate X.
- static: batch B, decode runs until the batch's longest output (E[max of B draws]) over the
  batch's live rows (it diminishes as outputs end); SLA-(b) uses the maximum output length
  (the paper's rule for static batching).
- continuous: iteration-level batching with B slots; Binomial(B, 1/E[S]) prefills ride in each
  iteration's pass; a round lasts the longest traverse or the busiest stage (``_continuous``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from coordinator.planner.candidate import Candidate, Metrics, WorkloadStats, infeasible
from coordinator.planner.costs import Costs, fill_time, lockstep_round, round_time
from coordinator.planner.layout import (
    Pipeline,
    build_pipeline,
    split_tp_workers,
    tp_stage_sizes,
)
from coordinator.planner.profile import Profile
from coordinator.planner.rra_table import (
    alive_probability,
    cycle_log_empty,
    cycle_sums,
    decode_parts,
    step_batches,
)
from coordinator.planner.waa_burst import Burst, RoundTable, burst_timeline, own_tpot
from coordinator.planner.waa_split import nearest_split, waa_share, waa_split  # noqa: F401
from coordinator.planner.workload import Workload


def simulate(cand: Candidate, workload: Workload | WorkloadStats,
             profile: Profile | Costs) -> Metrics:
    stats = workload if isinstance(workload, WorkloadStats) else WorkloadStats(workload)
    costs = profile if isinstance(profile, Costs) else Costs(profile)
    if cand.policy.startswith("waa"):
        return _waa(cand, stats, costs)
    tps = tp_stage_sizes(cand.num_workers, cand.tp, cand.num_tp_workers)
    pipe = build_pipeline(costs.profile, tps, enc=True, dec=True)
    if pipe is None:
        return infeasible(f"{len(tps)} pipeline stages exceed the model's layers")
    fn = {"rra": _rra, "static": _static, "continuous": _continuous}[cand.policy]
    return fn(cand, stats, costs, pipe)


def _finish(costs: Costs, stats: WorkloadStats, pipes: dict[str, Pipeline], *, x: float,
            lat_b: float, lat_a: float, ttft: float, tpot: float, b_d: float,
            util: list[float], mem: list[float], extra: dict[str, float] | None = None
            ) -> Metrics:
    capacity = costs.capacity
    over = [i for i, m in enumerate(mem) if m > capacity]
    reason = (f"out of memory on worker {over[0]}: {mem[over[0]] / 1e9:.1f} GB > "
              f"{capacity / 1e9:.1f} GB usable") if over else ""
    return Metrics(not over, reason, x, x * stats.mean_s, lat_b, lat_a, ttft, tpot, b_d,
                   tuple(util), tuple(mem), capacity, pipes, extra or {})


def _per_worker(pipe: Pipeline, values: list[float]) -> list[float]:
    return [v for st, v in zip(pipe, values, strict=True) for _ in range(st.tp)]


def expected_encode(costs: Costs, pipe: Pipeline, batch: int, stats: WorkloadStats,
                    kind: str = "stage") -> list[float]:
    """Per-stage encode time of a batch of ``batch`` inputs, averaged over batch compositions
    (``kind``: which fixed per-pass overhead the mesh adds, costs.py)."""
    return costs.expected_encode(pipe, batch, stats, kind)


def rra_cycle(cand: Candidate, stats: WorkloadStats) -> tuple[np.ndarray, np.ndarray]:
    """Expected decode batch and mean context at offsets u = 1..N_D of a cycle."""
    sums, ctx = cycle_sums(stats, cand.N_D)
    return cand.B_E * sums, ctx


@dataclass
class RRACycle:
    """An RRA cycle at offsets u = 1..N_D: what throughput needs (``objective.throughput``);
    latency and memory (``rra_core``) add the rest."""

    batch: np.ndarray  # expected rows of a stream
    ctx: np.ndarray  # their mean context
    alive: np.ndarray  # P(a stream has a live row)
    enc: list[float]  # encode time of B_E per stage
    live: list[np.ndarray]  # per stage: a live stream's step
    dec: list[np.ndarray]  # per stage: a stream's expected step (live x alive: utilisation)
    t_enc: float  # the encode round (a fill)
    t_dec: np.ndarray  # the expected decode round
    cycle: float


def _rra_cycle(cand: Candidate, stats: WorkloadStats, costs: Costs, pipe: Pipeline
               ) -> RRACycle:
    streams = len(pipe)
    batch, ctx = rra_cycle(cand, stats)
    enc = expected_encode(costs, pipe, cand.B_E, stats)
    # A step runs only while some stream is alive: with a long N_D the tail of a cycle is
    # often empty for a stream, which then waits for the others (the lock step) and, once
    # all are empty, the streams go to their next encodes. A stream is alive at offset u with
    # P(any of its rows is); its live steps run the batch given that.
    alive = alive_probability(cand.B_E, cycle_log_empty(stats, cand.N_D))
    tps = {st.tp for st in pipe}
    live = costs.decode_pipeline(pipe, step_batches(batch, alive), ctx,
                                 decode_parts(costs, stats, tps, cand.N_D, cand.B_E, True))
    # per stream and stage, the expected busy time of a step (utilisation)
    scaled: dict[int, np.ndarray] = {}  # repeated stages share one array: scale it once
    dec = [scaled[id(d)] if id(d) in scaled else scaled.setdefault(id(d), d * alive)
           for d in live]
    # the streams start their cycles in lock step on a pipeline the short decode passes
    # leave nearly empty: the encode round pays the fill (coordinator/pipeline_driver.py)
    t_enc = fill_time(enc, streams)
    t_dec = lockstep_round(live, streams, alive)
    return RRACycle(batch, ctx, alive, enc, live, dec, t_enc, t_dec,
                    t_enc + float(t_dec.sum()))


@dataclass
class Core:
    """What the search's score needs of a candidate (``objective.score``): throughput, the
    p99-length latency (SLA-(a) = SLA-(b) for RRA and WAA) and each stage's memory, plus the
    intermediate values the full metrics reuse."""

    x: float
    lat: float
    mem: list[float]
    parts: dict[str, Any]


def rra_core(cand: Candidate, stats: WorkloadStats, costs: Costs, pipe: Pipeline,
             distinct: bool = False) -> Core:
    """``distinct``: memory of one stage per memory shape only (enough for the peak)."""
    streams = len(pipe)
    cyc = _rra_cycle(cand, stats, costs, pipe)
    batch, ctx, t_enc, cycle = cyc.batch, cyc.ctx, cyc.t_enc, cyc.cycle
    tps = {st.tp for st in pipe}
    # the p99-length request is itself alive in every step it waits for, the other streams
    # with their own probability
    own = costs.decode_pipeline(pipe, step_batches(batch, None), ctx,
                                decode_parts(costs, stats, tps, cand.N_D, cand.B_E, False))
    t_alive = lockstep_round(cyc.live, streams, cyc.alive, own=own)
    s = stats.s99
    offset = 1 + (s - 1) % cand.N_D
    lat = ((-(-s // cand.N_D) - 1) * (t_enc + float(t_alive.sum())) + t_enc
           + float(t_alive[:offset].sum()))
    peak_tokens = float(np.max(batch * ctx)) * streams
    mem = [w + costs.kv_bytes_held(st, peak_tokens)
           for st, w in costs.weighted_stages(pipe, distinct)]
    return Core(streams * cand.B_E / cycle, lat, mem, {
        "batch": batch, "enc": cyc.enc, "dec": cyc.dec, "t_enc": t_enc, "t_dec": cyc.t_dec,
        "cycle": cycle})


def _rra(cand: Candidate, stats: WorkloadStats, costs: Costs, pipe: Pipeline) -> Metrics:
    streams = len(pipe)
    core = rra_core(cand, stats, costs, pipe)
    enc, dec, cycle, t_enc = (core.parts[k] for k in ("enc", "dec", "cycle", "t_enc"))
    util = [streams * (e + float(d.sum())) / cycle for e, d in zip(enc, dec, strict=True)]
    return _finish(costs, stats, {"pipeline": pipe}, x=core.x, lat_b=core.lat,
                   lat_a=core.lat, ttft=t_enc + float(core.parts["t_dec"][0]),
                   tpot=cycle / cand.N_D, b_d=float(core.parts["batch"][0]),
                   util=_per_worker(pipe, util), mem=_per_worker(pipe, core.mem),
                   extra={"cycle_s": cycle, "t_encode_s": t_enc})


def _static(cand: Candidate, stats: WorkloadStats, costs: Costs, pipe: Pipeline) -> Metrics:
    streams, b = len(pipe), cand.B_E
    steps = np.arange(1, stats.s_max + 1, dtype=np.float64)
    ctx = stats.mean_in + steps
    enc = expected_encode(costs, pipe, b, stats)
    out = stats.workload.output
    surv = out.survival(steps)
    p_running = surv if b == 1 else 1.0 - (1.0 - surv) ** b
    # the batch diminishes: the runner computes only its live rows (a finished request leaves
    # and is answered at once, coordinator/streams.py), so step k of a batch still running
    # decodes E[live | running] = B P(S >= k) / P(max of B >= k) rows, not B
    live = np.maximum(b * surv / np.maximum(p_running, 1e-300), 1.0)
    dec = costs.decode_pipeline(pipe, live, ctx)
    # static streams drift apart (no lock step): each stream's encode holds every stage in
    # turn while the other streams' decode passes queue behind it, so each of the P encodes
    # of a round costs about its whole pipeline traverse (DES: within -7% / +9%, des.py)
    t_enc = streams * float(sum(enc))
    t_dec = round_time(dec, streams)
    cycle = t_enc + float(p_running @ t_dec)
    cum = t_enc + np.cumsum(t_dec)
    lat_b = float(cum[stats.s_max - 1])
    lat_a = float(cum[out.max_quantile(b, 0.99) - 1])
    util = [streams * (e + float(p_running @ d)) / cycle for e, d in zip(enc, dec, strict=True)]
    held = streams * b * (stats.workload.input.max + stats.s_max)  # preallocated for max length
    mem = [costs.weight_bytes(st) + costs.kv_bytes_held(st, held) for st in pipe]
    return _finish(costs, stats, {"pipeline": pipe}, x=streams * b / cycle, lat_b=lat_b,
                   lat_a=lat_a, ttft=t_enc + float(t_dec[0]), tpot=own_tpot(surv, np.cumsum(t_dec)),
                   b_d=float(b), util=_per_worker(pipe, util), mem=_per_worker(pipe, mem),
                   extra={"cycle_s": cycle, "t_encode_s": t_enc,
                          # what a client sees of a p99-length request (its own last token;
                          # SLA-(b) above runs to the maximum length, the paper's rule)
                          "latency_to_p99_token_s": float(cum[stats.s99 - 1])})


def prefill_law(slots: int, mean_s: float, streams: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(k, P(one stream's iteration prefills k), P(the most any of ``streams`` streams
    prefills in one round is k), the same seen by a live request, whose own stream has only
    B - 1 other slots to refill): each of the B busy slots finishes in a given iteration with
    probability 1/E[S] (Little's law), so k ~ Binomial(B, 1/E[S]), cut where the tail is
    < 1e-12."""
    from scipy.stats import binom

    q = min(1.0, 1.0 / mean_s)
    k_max = int(binom.ppf(1.0 - 1e-12, slots, q)) if q < 1.0 else slots
    ks = np.arange(0, max(k_max, 0) + 1)
    pk = binom.pmf(ks, slots, q)
    pk = pk / pk.sum()
    own = binom.cdf(ks, slots - 1, q)
    cdf = np.cumsum(pk)
    return (ks, pk, np.diff(np.concatenate([[0.0], cdf ** streams])),
            np.diff(np.concatenate([[0.0], cdf ** (streams - 1) * own / own[-1]])))


def _continuous(cand: Candidate, stats: WorkloadStats, costs: Costs, pipe: Pipeline) -> Metrics:
    """Each stream's iteration decodes its B slots and prefills the k that finished the
    iteration before (``prefill_law``), in ONE pass per stage. The P streams are not in lock
    step: a round (every stream one iteration) lasts at least the longest pass's traverse of
    all stages, and at least the busiest stage's load (its P passes). Both depend on the
    round's prefills: the traverse on the largest k among the P streams (K), the load on
    that K plus the other P - 1 streams' mean prefill. So ``T_iter = E_K[max(sum_s (d_s +
    e_s(K)), max_s (P d_s + e_s(K) + (P - 1) mean_e_s))]``; with identical passes this is
    ``round_time``. A live request's latency is s x the same round seen from its stream.
    (Charging the mean prefill to every pass, the former formula, priced a fractional
    prefill at a one-sequence pass and ignored that a prefill holds the other streams up:
    the DES measured -50%..+110% against it; see docs/planner.md for the agreement now.)"""
    streams, b = len(pipe), float(cand.B_E)
    joins = b / stats.mean_s
    ctx = stats.in_decode_weighted + stats.mean_age
    dec = np.array([float(costs.decode_stage(st, np.array([b]), np.array([ctx]))[0])
                    for st in pipe])
    ks, pk, pmax, pmax_live = prefill_law(cand.B_E, stats.mean_s, streams)
    kf = ks.astype(np.float64)
    pre = np.stack([np.where(ks > 0, costs.encode_stage(st, np.maximum(kf, 1.0), stats.mean_in,
                                                         stats.eff_in, None), 0.0)
                    for st in pipe])  # [stage, k]: prefill of k newcomers, in the decode pass
    mean_pre = pre @ pk
    traverse = dec.sum() + pre.sum(axis=0)
    load = (streams * dec + (streams - 1) * mean_pre)[:, None] + pre
    rounds = np.maximum(traverse, load.max(axis=0))  # per K
    t_iter = float(pmax @ rounds)
    # the p99-length request's rounds: its own stream refills at most B - 1 slots meanwhile
    lat = stats.s99 * float(pmax_live @ rounds)
    util = [streams * float(d + e) / t_iter for d, e in zip(dec, mean_pre, strict=True)]
    mem = [costs.weight_bytes(st) + costs.kv_bytes_held(st, streams * b * ctx) for st in pipe]
    return _finish(costs, stats, {"pipeline": pipe}, x=streams * joins / t_iter, lat_b=lat,
                   lat_a=lat, ttft=t_iter, tpot=t_iter, b_d=b, util=_per_worker(pipe, util),
                   mem=_per_worker(pipe, mem), extra={"iteration_s": t_iter})


# ---- WAA ----------------------------------------------------------------------------------------
def waa_pipelines(cand: Candidate, stats: WorkloadStats, costs: Costs
                  ) -> tuple[Pipeline, Pipeline] | None:
    num_enc = waa_split(cand, stats, costs)
    tps = split_tp_workers(num_enc, cand.num_workers - num_enc, cand.tp, cand.num_tp_workers)
    if num_enc == 0 or tps is None:
        return None
    enc_pipe = build_pipeline(costs.profile, tps[0], enc=True, dec=False)
    dec_pipe = build_pipeline(costs.profile, tps[1], enc=False, dec=True)
    if enc_pipe is None or dec_pipe is None or cand.B_m > len(dec_pipe):
        return None
    return enc_pipe, dec_pipe


def waa_stage_times(costs: Costs, pipe: Pipeline, b_d: float, ctx: float, num_micro: int
                    ) -> list[float]:
    """Each decoder stage's time for one micro-batch step (per-layer cost once per TP degree)."""
    b = b_d / num_micro
    if b <= 0:
        return [0.0] * len(pipe)
    return costs.per_stage(pipe, b, ctx, float, None, "waa_decode")


def waa_round(costs: Costs, pipe: Pipeline, b_d: float, ctx: float, num_micro: int) -> float:
    return float(round_time(waa_stage_times(costs, pipe, b_d, ctx, num_micro), num_micro))


def waa_core(cand: Candidate, stats: WorkloadStats, costs: Costs,
             pipes: tuple[Pipeline, Pipeline], distinct: bool = False) -> Core:
    """``distinct``: memory of one stage per memory shape only (enough for the peak)."""
    enc_pipe, dec_pipe = pipes
    enc = expected_encode(costs, enc_pipe, cand.B_E, stats, "waa_encode")
    e_lat, e_period = sum(enc), max(enc)
    hand = costs.handoff(dec_pipe, cand.B_E * stats.mean_in)
    ctx = stats.in_decode_weighted + stats.mean_age
    b_d = cand.B_E * stats.mean_s
    rnd = waa_round(costs, dec_pipe, b_d, ctx, cand.B_m)
    if e_period <= rnd:  # decoder-bound: one batch merged per round
        x = cand.B_E / rnd
        pre = np.ceil((e_lat + hand) / rnd - 1e-9) * rnd
        lat, ttft, tpot, peak = pre + stats.s99 * rnd, pre + rnd, rnd, b_d
        busy = 1.0  # a round follows a round
        batches_ahead = max(1.0, np.ceil((e_lat + hand) / rnd))
    else:  # encoder-bound: a batch merges every period and thins out (waa_burst.py)
        x = cand.B_E / e_period
        burst = waa_burst(cand, stats, costs, dec_pipe, ctx, e_period)
        b_d, peak = burst.mean_batch, burst.peak_batch
        rnd = waa_round(costs, dec_pipe, b_d, ctx, cand.B_m)
        pre = e_lat + hand
        first = float(burst.to_token[0])
        lat = pre + burst.to_p99
        ttft, tpot = pre + first, burst.tpot(stats.surv)
        busy = burst.busy  # the decoders idle between a burst's tail and the next merge
        batches_ahead = float(np.ceil((e_lat + hand) / e_period - 1e-9))  # one per period
    in_flight = batches_ahead * cand.B_E * stats.mean_in
    mem = [w + costs.encoder_kv_bytes(st, float(in_flight))
           for st, w in costs.weighted_stages(enc_pipe, distinct)]
    mem += [w + costs.kv_bytes_held(st, peak * ctx)
            for st, w in costs.weighted_stages(dec_pipe, distinct)]
    return Core(x, lat, mem, {"enc": enc, "e_lat": e_lat, "e_period": e_period, "hand": hand,
                              "ctx": ctx, "b_d": b_d, "rnd": rnd, "pre": pre, "ttft": ttft,
                              "tpot": tpot, "peak": peak, "busy": busy})


def waa_burst(cand: Candidate, stats: WorkloadStats, costs: Costs, dec_pipe: Pipeline,
              ctx: float, e_period: float) -> Burst:
    """The encoder-bound decoders' burst timeline (waa_burst.py), memoised per candidate:
    the search's score and the full metrics ask for the same one."""
    cache = costs.__dict__.setdefault("_waa_burst", {})
    key = (cand.B_E, cand.B_m, id(dec_pipe), ctx, e_period, id(stats))
    if key not in cache:
        m = cand.B_m

        def rounds(b: np.ndarray) -> np.ndarray:
            per = costs.per_stage(dec_pipe, b / m, ctx, lambda t: np.where(b > 0, t, 0.0),
                                  None, "waa_decode")
            return round_time(per, m)

        table = RoundTable(rounds, float(cand.B_E))
        cache[key] = (burst_timeline(cand.B_E, e_period, stats.surv, table, stats.s99),
                      stats, dec_pipe)  # both kept alive: their ids stay valid
    return cache[key][0]


def _waa(cand: Candidate, stats: WorkloadStats, costs: Costs) -> Metrics:
    pipes = waa_pipelines(cand, stats, costs)
    if pipes is None:
        return infeasible("the TP workers or micro-batches do not fit this WAA split")
    enc_pipe, dec_pipe = pipes
    core = waa_core(cand, stats, costs, pipes)
    enc, ctx, b_d, rnd, busy = (core.parts[k] for k in ("enc", "ctx", "b_d", "rnd", "busy"))
    util = [core.x / cand.B_E * e for e in enc] + [
        busy * cand.B_m * t / rnd
        for t in waa_stage_times(costs, dec_pipe, b_d, ctx, cand.B_m)]
    n_enc, mem = len(enc_pipe), core.mem
    workers = _per_worker(enc_pipe, util[:n_enc]) + _per_worker(dec_pipe, util[n_enc:])
    mems = _per_worker(enc_pipe, mem[:n_enc]) + _per_worker(dec_pipe, mem[n_enc:])
    return _finish(costs, stats, {"encoder": enc_pipe, "decoder": dec_pipe},
                   x=core.x, lat_b=core.lat, lat_a=core.lat, ttft=core.parts["ttft"],
                   tpot=core.parts["tpot"], b_d=b_d,
                   util=workers, mem=mems,
                   extra={"round_s": rnd, "encode_latency_s": core.parts["e_lat"],
                          "handoff_s": core.parts["hand"],
                          "encode_period_s": core.parts["e_period"],
                          "peak_decode_batch": core.parts["peak"]})
