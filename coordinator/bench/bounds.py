"""Latency bounds the paper's way: the static-batching baseline over batch sizes, then the
bottom 10%, 30% and 70% of its latencies, plus no bound.

``auto`` measures the baseline on the mesh (a few batch sizes: each is a mesh run); the
``predicted`` mode takes the planner's static latencies and runs nothing. The baseline's
latency is its maximum-length latency (measured: the slowest request of the run, encode start
to last token), the paper's rule for systems without early termination and the planner's for
static plans: bounds from the static p99-length latency would be ones no static plan can be
planned for. Both modes stop at the largest batch the K
requests fill twice on every stream: the paper's grid (steps of 4 up to 512) sizes bounds for
batches a K-request run never forms, and a plan for such a bound never reaches its steady
state here. A concurrency cap (``--max-in-flight``) also stops them at the largest batch
whose B x streams requests in flight the cap allows: the bounds then come from static plans
the capped planner may itself choose (with the default cap, K // 2, both stops agree).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

PERCENTILES = (10, 30, 70)
MEASURED_BATCHES = (1, 2, 4, 8, 16, 32)


def percentile_bounds(latencies: Sequence[float]) -> list[float | None]:
    """The 10th, 30th and 70th percentiles of ``latencies`` (ascending), then None (no bound).

    Non-finite latencies (a run that produced no p99-length request) are left out."""
    lats = [float(x) for x in latencies if x is not None and math.isfinite(x)]
    if not lats:
        raise ValueError("no static-batching latency to derive bounds from (every baseline run "
                         "failed or fitted no batch); pass --bounds L1,L2,...")
    return [float(np.percentile(lats, q)) for q in PERCENTILES] + [None]


def measured_batches(num_streams: int, num_requests: int, asked: Sequence[int] = (),
                     max_in_flight: int | None = None) -> list[int]:
    """Batch sizes the measured baseline runs: ``asked``, else powers of two up to
    ``batch_cap``."""
    if asked:
        return sorted(set(asked))
    cap = batch_cap(num_streams, num_requests, max_in_flight)
    return [b for b in MEASURED_BATCHES if b <= cap] or [1]


def batch_cap(num_streams: int, num_requests: int, max_in_flight: int | None = None) -> int:
    """The largest static batch K requests fill twice on every stream and, with a cap, whose
    B x streams requests in flight (planner/inflight.py) stay within it (at least 1)."""
    streams = max(num_streams, 1)
    cap = num_requests // (2 * streams)
    if max_in_flight is not None:
        cap = min(cap, max_in_flight // streams)
    return max(1, cap)


def predicted_latencies(workload: object, profile: object, workers: int,
                        max_batch: int) -> list[tuple[int, float]]:
    """(batch, planner's static SLA-(b) latency) for every feasible batch 1..max_batch (step
    4 above 16, the paper's step)."""
    from coordinator.planner.candidate import Candidate, WorkloadStats
    from coordinator.planner.costs import Costs
    from coordinator.planner.simulator import simulate

    stats, costs = WorkloadStats(workload), Costs(profile)  # type: ignore[arg-type]
    out = []
    for b in [*range(1, min(max_batch, 16) + 1), *range(20, max_batch + 1, 4)]:
        m = simulate(Candidate("static", workers, 1, 0, b), stats, costs)
        if m.feasible:
            out.append((b, m.latency_p99len_s))
    return out


def bound_runs_requests(batch: int, num_streams: int) -> int:
    """Requests a measured baseline run of ``batch`` gets: two batches per stream, >= 8."""
    return max(8, 2 * batch * max(num_streams, 1))
