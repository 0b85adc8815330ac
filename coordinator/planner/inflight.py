"""Requests in flight: how many requests a schedule holds at once in its steady state.

One definition, used by the search's concurrency cap (``scheduler.search(max_in_flight=N)``,
like vLLM's ``max_num_seqs``: never plan for more than N requests in flight) and by the
bench's check that K requests fill a plan (``coordinator/bench/evaluate.py``). A request is
in flight from its encode to its last token, counted as the runner counts it:

- static: B per stream, held to the batch's longest output (no early termination), on each
  of the P streams (pipeline stages): ``B x P``;
- continuous: B slots per stream, refilled as they finish: ``B x P``;
- rra: each stream's decode batch right after its encode, the largest of its cycle (the B_E
  just encoded plus the survivors of earlier encodes; Little's law: ``B_D = B_E x
  E[ceil(S / N_D)]``): ``B_D x P``;
- waa-c / waa-m: the decoders' batch at its peak (decoder-bound: ``B_D = B_E x E[S]``;
  encoder-bound: the merged batch's peak, ``waa_burst.py``) plus the batches encoded or
  encoding but not yet merged (``B_E x des_events.waa_cap``): the runner counts a decoder's
  sequences from the moment a batch is placed on it (``planning.adjust_bands``, whose decode
  band is this count +- its noise). B_m micro-batches split the decode batch, they add none.

These are expectations: a run's own count swings around them (the WAA decode band's 2 sigma,
a stream's luck in its lengths), as the throughput and latency predictions do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from coordinator.planner.candidate import Candidate, Metrics
from coordinator.planner.des_events import waa_cap

PIPELINE_POLICIES = ("rra", "static", "continuous")
_WAA_KEYS = ("encode_latency_s", "handoff_s", "encode_period_s", "round_s")


def requests_in_flight(policy: str, B_E: int, B_D: float, streams: int,  # noqa: N803
                       extra: Mapping[str, Any]) -> float:
    """The count above from a schedule's knobs and predictions: ``streams`` is the pipeline
    plans' stream count (their stages), ``extra`` the WAA metrics' ``extra`` (or a plan's
    ``predicted``, which holds them)."""
    if policy in ("static", "continuous"):
        return float(B_E * streams)
    if policy == "rra":
        return float(B_D) * streams
    if not policy.startswith("waa"):
        raise ValueError(f"no in-flight count for policy {policy!r}")
    if all(k in extra for k in _WAA_KEYS):
        ahead = waa_cap({k: float(extra[k]) for k in _WAA_KEYS})
    else:  # a plan written before these predictions were recorded: one batch ahead
        ahead = 1
    peak = float(extra.get("peak_decode_batch", B_D))
    return peak + B_E * ahead


def candidate_in_flight(cand: Candidate, metrics: Metrics) -> float:
    """``requests_in_flight`` of a costed candidate (inf when it cannot run at all)."""
    if not metrics.pipelines:
        return math.inf
    pipe = metrics.pipelines.get("pipeline")
    return requests_in_flight(cand.policy, cand.B_E, metrics.B_D,
                              len(pipe) if pipe is not None else 1, metrics.extra)


def plan_in_flight(plan: Any) -> float:
    """``requests_in_flight`` of a Plan (coordinator.planner.plan), from its own fields: a
    pipeline plan's streams are its ``microbatches`` (plan_launch runs that many)."""
    streams = int(plan.microbatches or 1) if plan.policy in PIPELINE_POLICIES else 1
    return requests_in_flight(plan.policy, int(plan.B_E), float(plan.B_D or 0.0), streams,
                              plan.predicted or {})
