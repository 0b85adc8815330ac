"""From (workload, profile, workers, bound) to a Plan: search, pick, and describe the schedule."""

from __future__ import annotations

import math
from typing import Any

from coordinator.planner.candidate import Candidate, Metrics, WorkloadStats
from coordinator.planner.costs import Costs
from coordinator.planner.des_events import waa_cap
from coordinator.planner.inflight import candidate_in_flight
from coordinator.planner.layout import Pipeline
from coordinator.planner.plan import Plan, WorkerGroup
from coordinator.planner.profile import Profile
from coordinator.planner.scheduler import (
    EPS_T,
    EXEGPT_POLICIES,
    InfeasibleBound,
    SearchResult,
    search,
    tightest_latency,
)
from coordinator.planner.workload import Workload

POLICY_CHOICES = {"auto": EXEGPT_POLICIES, "rra": ("rra",), "waa": ("waa-c", "waa-m"),
                  "waa-c": ("waa-c",), "waa-m": ("waa-m",), "static": ("static",),
                  "continuous": ("continuous",), "all": EXEGPT_POLICIES + ("static", "continuous")}


def policies_for(name: str) -> tuple[str, ...]:
    if name not in POLICY_CHOICES:
        raise ValueError(f"unknown policy {name!r}; choose from {sorted(POLICY_CHOICES)}")
    return POLICY_CHOICES[name]


def make_plan(workload: Workload, profile: Profile, num_workers: int, latency_bound: float, *,
              policy: str = "auto", sla: str = "b", exhaustive: bool = False,
              eps_t: float = EPS_T, eps_l: float = 0.05, max_in_flight: int | None = None
              ) -> Plan:
    """The highest-throughput plan meeting the bound and holding at most ``max_in_flight``
    requests in flight (inflight.py; None: no cap); InfeasibleBound names the tightest
    latency, or the cap when it is what leaves no plan."""
    stats, costs = WorkloadStats(workload), Costs(profile)
    pols = policies_for(policy)
    result = search(stats, costs, num_workers, latency_bound, policies=pols, sla=sla,
                    use_exhaustive=exhaustive, eps_t=eps_t, eps_l=eps_l,
                    max_in_flight=max_in_flight)
    if result.best is None:
        if max_in_flight is not None:
            _cap_infeasible(result, num_workers, latency_bound, pols, sla, max_in_flight)
        tight, cand = tightest_latency(stats, costs, num_workers, policies=pols, sla=sla)
        if cand is None:
            raise InfeasibleBound(
                f"no {'/'.join(pols)} plan fits in memory on {num_workers} workers of "
                f"{profile.meta['device']}; use more workers or a smaller model")
        raise InfeasibleBound(
            f"no plan meets the {latency_bound:g} s bound (SLA-({sla})) on {num_workers} "
            f"workers; the tightest reachable latency is {tight:.3g} s ({cand.policy}, "
            f"tp={cand.tp}, B_E={cand.B_E}); raise the bound or add workers")
    cand, metrics = result.best
    return plan_from(cand, metrics, stats, profile, latency_bound, sla, result,
                     max_in_flight=max_in_flight)


def _cap_infeasible(result: SearchResult, num_workers: int, bound: float,
                    pols: tuple[str, ...], sla: str, cap: int) -> None:
    """Raise InfeasibleBound naming the cap when a plan meets the bound and memory but holds
    more than ``cap`` requests (the cap is what empties the search); return when none does
    (the bound or memory is the reason, said as without a cap)."""
    held, cand = result.fewest_in_flight
    if cand is None:
        return
    bounded = f" and meets the {bound:g} s bound (SLA-({sla}))" if bound < 1e17 else ""
    requests = "request" if cap == 1 else "requests"
    raise InfeasibleBound(
        f"no {'/'.join(pols)} plan holds at most {cap} {requests} in flight (the "
        f"max_in_flight cap){bounded} on {num_workers} workers; the fewest any such plan "
        f"holds is {held:.1f} ({cand.policy}, tp={cand.tp}, B_E={cand.B_E}"
        f"{f', N_D={cand.N_D}' if cand.policy == 'rra' else ''}); raise the cap to at "
        f"least {math.ceil(held - 1e-9)}")


def adjust_bands(cand: Candidate, metrics: Metrics, stats: WorkloadStats) -> dict[str, list[float]]:
    """Dynamic adjustment: the runner changes the next B_E when the encoder's token sum or the
    decode batch leaves mean +- 2 sigma (sums of independent lengths; the paper gives no
    values). Sigma: sqrt(B_E) * std(I) for the token sum, sqrt(B_D) for the decode batch.

    The runner counts a decoder's sequences from the moment a batch is placed on it, so the
    WAA decode band also holds the batches encoded for the decoders but not yet merged (the
    DES's ``waa_cap``). An encoder-bound WAA plan's decode batch does not hover around B_D:
    it swings from a merged batch's peak to near empty every encoder period
    (planner/waa_burst.py), so its band is [0, peak + 2 sqrt(peak) + those batches]: the
    runner keeps the plan's B_E unless the decoders hold more than the plan ever has (a
    B_D +- 2 sigma band there cut every batch to one or two requests on the mesh), and never
    grows it (the encoder is already the bottleneck)."""
    tok_mean = cand.B_E * stats.mean_in
    tok_sd = math.sqrt(cand.B_E) * stats.workload.input.std
    bd_sd = math.sqrt(max(metrics.B_D, 0.0))
    decode = [max(metrics.B_D - 2 * bd_sd, 0.0), metrics.B_D + 2 * bd_sd]
    extra = metrics.extra
    if "peak_decode_batch" in extra:
        ahead = cand.B_E * waa_cap(extra)
        if extra["encode_period_s"] > extra["round_s"]:  # never grown: the encoder is full
            peak = extra["peak_decode_batch"]
            decode = [0.0, peak + 2 * math.sqrt(peak) + ahead]
        else:
            decode = [decode[0] + ahead, decode[1] + ahead]
    return {"token_sum": [max(tok_mean - 2 * tok_sd, 0.0), tok_mean + 2 * tok_sd],
            "decode_batch": decode}


def _groups(role: str, pipe: Pipeline, model_is_t5: bool) -> list[WorkerGroup]:
    return [WorkerGroup(role, st.tp, st.tp, st.dec_layers,
                        st.enc_layers if model_is_t5 else None) for st in pipe]


def predicted(metrics: Metrics) -> dict[str, Any]:
    return {
        "throughput_seq_s": metrics.throughput_seq_s, "throughput_tok_s": metrics.throughput_tok_s,
        "latency_p99len_s": metrics.latency_p99len_s, "latency_p99_s": metrics.latency_p99_s,
        "ttft_s": metrics.ttft_s, "tpot_s": metrics.tpot_s,
        "worker_util": list(metrics.worker_util),
        "worker_mem_bytes": list(metrics.worker_mem_bytes),
        "mem_capacity_bytes": metrics.mem_capacity_bytes, **metrics.extra,
    }


def plan_from(cand: Candidate, metrics: Metrics, stats: WorkloadStats, profile: Profile,
              latency_bound: float, sla: str, result: SearchResult | None = None, *,
              max_in_flight: int | None = None) -> Plan:
    """The Plan of a costed candidate; ``max_in_flight``: the cap it was searched under
    (``search.max_in_flight``; ``predicted.requests_in_flight`` is what it holds)."""
    t5 = profile.model.is_encoder_decoder
    if "pipeline" in metrics.pipelines:
        groups = _groups("pipeline", metrics.pipelines["pipeline"], t5)
        micro = len(metrics.pipelines["pipeline"])
    else:
        groups = (_groups("encoder", metrics.pipelines["encoder"], t5)
                  + _groups("decoder", metrics.pipelines["decoder"], t5))
        micro = cand.B_m
    search_info: dict[str, Any] = {"tp": cand.tp, "num_tp_workers": cand.num_tp_workers,
                                   "max_in_flight": max_in_flight}
    if result is not None:
        search_info |= {"method": result.method, "seconds": result.seconds,
                        "candidates_evaluated": result.evaluated,
                        "per_run": {k: (None if v is None else {
                            "B_E": v[0].B_E, "N_D": v[0].N_D, "B_m": v[0].B_m,
                            "num_tp_workers": v[0].num_tp_workers,
                            "throughput_seq_s": v[1].throughput_seq_s,
                            "latency_s": v[1].latency(sla)}) for k, v in result.per_run.items()}}
    wl = stats.workload
    return Plan(
        policy=cand.policy, model=profile.meta["model"], workload=wl.spec,
        latency_bound_s=latency_bound, sla=sla, num_workers=cand.num_workers,
        worker_groups=tuple(groups), B_E=cand.B_E, B_D=metrics.B_D,
        N_D=cand.N_D if cand.policy == "rra" else None,
        B_m=cand.B_m if cand.policy.startswith("waa") else None, microbatches=micro,
        adjust=adjust_bands(cand, metrics, stats),
        predicted=predicted(metrics) | {"requests_in_flight": candidate_in_flight(cand, metrics)},
        search=search_info, profile_meta={k: v for k, v in profile.meta.items() if k != "model"},
        workload_info={"description": wl.describe(), "p99_output": wl.p99_output,
                       "mean_input": wl.input.mean, "mean_output": wl.output.mean},
    )
