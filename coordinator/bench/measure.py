"""Request lifecycles -> the numbers the planner predicts, measured the planner's way.

Latencies are timed from a request's encode start (the paper's definition; under saturation
the wait in the coordinator's queue grows with how many requests were sent, not with the
schedule, so it is reported separately as ``queue_p50_s``):
- ``latency_p99len_s`` (SLA-(b)): mean time from encode start to the p99-th output token over
  the requests that produced that many tokens (the probes guarantee some), as the planner's
  discrete-event simulator measures it;
- ``latency_p99_s`` (SLA-(a)): 99th percentile of encode start -> last token;
- ``ttft_s``: mean encode start -> first token; ``tpot_s``: mean time per output token after
  the first.
Throughput is steady state like the simulator's: requests admitted (encode started) per second
between the admission of the first 20% and the last admission (the queue running dry), so the
pipeline's fill and drain do not count; the makespan figure (all requests over first arrival ->
last finish) is reported beside it, and stands in (``throughput_basis``) when admissions were
never paced by completions (the queue ran dry before the first request finished).
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

WARM_FRACTION = 0.2
MIN_WINDOW_S = 1e-3  # a steady-state window shorter than this is one admission
MIN_WINDOW_FRACTION = 0.05  # ... or shorter than this share of the admissions' span
COMPARED = ("throughput_seq_s", "throughput_tok_s", "latency_p99len_s", "latency_p99_s",
            "ttft_s", "tpot_s")


@dataclass(frozen=True)
class RequestRecord:
    """What one request did: the target length, what came back, and its timestamps."""

    input_len: int
    output_len: int
    num_tokens: int
    finish_reason: str | None
    error: str | None = None
    t_arrival: float | None = None
    t_encode_start: float | None = None
    t_encode_end: float | None = None
    t_first_token: float | None = None
    t_finish: float | None = None
    t_tokens: tuple[float, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return self.error is None and self.t_finish is not None and self.t_encode_start is not None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["t_tokens"] = list(self.t_tokens)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestRecord:
        return cls(**{**data, "t_tokens": tuple(data.get("t_tokens") or ())})


def steady_throughput(starts: Sequence[float], finishes: Sequence[float] = ()
                      ) -> float | None:
    """Admissions per second in [start of the 20%-th admission, last admission); None when
    there is no steady state to see: every request admitted at once, or the queue ran dry
    before any request finished (admissions were never paced by completions).

    Both ends snap back to the first admission of their *burst*: the admissions with no
    request finishing between them (one encode batch; RRA's lock-stepped streams, sent a
    millisecond apart after the same finish). Cutting a burst would drop part of one cycle's
    admissions from the count but not its time: 10% low on a two-stream RRA run of 6 cycles."""
    times = sorted(starts)
    if len(times) < 2:
        return None
    fins = sorted(finishes)

    def burst_start(i: int) -> int:
        before = bisect.bisect_left(fins, times[i])  # finishes strictly before times[i]
        return bisect.bisect_right(times, fins[before - 1]) if before else 0

    i_a = burst_start(min(int(len(times) * WARM_FRACTION), len(times) - 1))
    i_b = burst_start(len(times) - 1)
    t_a, t_b = times[i_a], times[i_b]
    first_finish = fins[0] if fins else math.inf
    # One encode batch admits its requests microseconds apart: a window that short is one
    # admission, not a rate (it once gave 3e4 seq/s), so it must span a real part of the run.
    if t_b - t_a < max(MIN_WINDOW_S, MIN_WINDOW_FRACTION * (times[-1] - times[0])) \
            or t_b < first_finish:
        return None
    return (i_b - i_a) / (t_b - t_a)


def p99_length_latencies(records: Sequence[RequestRecord], s99: int) -> list[float]:
    """Encode start -> s99-th token of each request with >= s99 tokens."""
    return [r.t_tokens[s99 - 1] - r.t_encode_start for r in records  # type: ignore[operator]
            if r.ok and len(r.t_tokens) >= s99 and r.t_encode_start is not None]


def standard_error(values: Sequence[float]) -> float | None:
    """The standard error of their mean (None: fewer than two)."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) >= 2 else None


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def measure(records: Sequence[RequestRecord], s99: int, bound_s: float | None) -> dict[str, Any]:
    """Every measured figure of one run (None where no request provides it)."""
    ok = [r for r in records if r.ok]
    out: dict[str, Any] = {"requests": len(records), "ok": len(ok),
                           "failed": len(records) - len(ok)}
    if not ok:
        return out | {k: None for k in COMPARED} | {"bound_met": False}
    first = min(r.t_arrival or r.t_encode_start for r in ok)  # type: ignore[type-var]
    makespan = max(r.t_finish for r in ok) - first  # type: ignore[type-var,operator]
    tokens = sum(r.num_tokens for r in ok)
    steady = steady_throughput([r.t_encode_start for r in ok],  # type: ignore[misc]
                               [r.t_finish for r in ok])  # type: ignore[misc]
    lat = [r.t_finish - r.t_encode_start for r in ok]  # type: ignore[operator]
    p99lens = p99_length_latencies(ok, s99)
    p99len = statistics.fmean(p99lens) if p99lens else None
    ttft = [r.t_first_token - r.t_encode_start for r in ok if r.t_first_token is not None]
    tpot = [(r.t_finish - r.t_first_token) / (r.num_tokens - 1) for r in ok  # type: ignore
            if r.t_first_token is not None and r.num_tokens > 1]
    queued = [r.t_encode_start - r.t_arrival for r in ok if r.t_arrival is not None]
    out |= {
        "makespan_s": makespan,
        "throughput_makespan_seq_s": len(ok) / makespan if makespan > 0 else None,
        "throughput_seq_s": steady if steady is not None else (
            len(ok) / makespan if makespan > 0 else None),
        "throughput_basis": "steady" if steady is not None else "makespan",
        "mean_output_tokens": tokens / len(ok),
        "latency_p99len_s": p99len, "p99len_requests": len(p99lens),
        # the mean's sampling error: a few p99-length requests, each at its own phase of the
        # schedule (RRA: before or after an encode pause), make it noisy on its own
        "latency_p99len_sem_s": standard_error(p99lens),
        "latency_p99_s": float(np.percentile(lat, 99)), "latency_max_s": max(lat),
        "ttft_s": _mean(ttft), "tpot_s": _mean(tpot),
        "queue_p50_s": statistics.median(queued) if queued else None,
        "finish_reasons": {k: sum(r.finish_reason == k for r in ok) for k in ("stop", "length")},
    }
    thr = out["throughput_seq_s"]
    out["throughput_tok_s"] = None if thr is None else thr * tokens / len(ok)
    out["bound_met"] = bound_met(p99len, bound_s, out["failed"])
    return out


def bound_met(p99len: float | None, bound_s: float | None, failed: int) -> bool:
    """A run meets its bound when nothing failed and its p99-length latency is within it
    (no p99-length request finished: not shown to be met)."""
    if failed:
        return False
    if bound_s is None:
        return True
    return p99len is not None and p99len <= bound_s


# The measured p99-length latency is encode start -> the p99-th token. A static plan's SLA-(b)
# runs to the maximum output length (the paper's rule for systems without early termination),
# so its prediction of the same moment is kept beside it under this name.
COMPARABLE = {"latency_p99len_s": "latency_to_p99_token_s"}


def comparable(predicted: dict[str, Any], key: str) -> Any:
    """The prediction of the moment ``key`` measures (see COMPARABLE)."""
    alt = COMPARABLE.get(key)
    return predicted[alt] if alt and predicted.get(alt) is not None else predicted.get(key)


def relative_errors(predicted: dict[str, Any], measured: dict[str, Any]) -> dict[str, float | None]:
    """(measured - predicted) / predicted per compared figure (None where either is missing)."""
    out: dict[str, float | None] = {}
    for key in COMPARED:
        p, m = comparable(predicted, key), measured.get(key)
        ok = isinstance(p, int | float) and isinstance(m, int | float) and p and math.isfinite(p)
        out[key] = (m - p) / p if ok else None  # type: ignore[operator]
    return out


def median_of(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-figure median over repeats (numbers only; the first run's other fields), and each
    compared figure's [min, max] over the repeats (``range``)."""
    if len(runs) == 1:
        return dict(runs[0])
    out = dict(runs[0])
    spread: dict[str, list[float]] = {}
    for key, value in runs[0].items():
        values = [r.get(key) for r in runs]
        if isinstance(value, int | float) and not isinstance(value, bool) and all(
                isinstance(v, int | float) for v in values):
            out[key] = statistics.median(values)  # type: ignore[arg-type]
            if key in COMPARED:
                spread[key] = [min(values), max(values)]  # type: ignore[type-var]
    out["bound_met"] = all(r.get("bound_met") for r in runs)
    out["range"] = spread
    return out
