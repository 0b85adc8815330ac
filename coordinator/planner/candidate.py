"""The values the simulator passes around: a candidate schedule, workload moments, metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from coordinator.planner.layout import Pipeline
from coordinator.planner.workload import Workload

POLICIES = ("rra", "waa-c", "waa-m", "static", "continuous")


@dataclass(frozen=True)
class Candidate:
    """One point of the search space. For static/continuous, ``B_E`` is the batch size."""

    policy: str
    num_workers: int
    tp: int = 1
    num_tp_workers: int = 0
    B_E: int = 1
    N_D: int = 1
    B_m: int = 1
    # WAA: the encoder workers, when they are given (the live workers after a loss) rather
    # than chosen by the WAA-C/M rule from B_E; 0 = chosen. Left out of repr: reprs of the
    # searched (chosen-split) candidates key the simulator's golden data
    num_encoders: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; expected one of {POLICIES}")
        if self.num_workers < 1 or self.B_E < 1 or self.N_D < 1 or self.B_m < 1:
            raise ValueError(f"workers, B_E, N_D and B_m must be >= 1: {self}")
        if self.num_tp_workers % self.tp or self.num_tp_workers > self.num_workers:
            raise ValueError(f"num_tp_workers must be a multiple of tp and <= workers: {self}")
        if self.policy.startswith("waa") and self.num_workers < 2:
            raise ValueError("WAA needs at least 2 workers (one encoder, one decoder)")
        if self.num_encoders and not 0 < self.num_encoders < self.num_workers:
            raise ValueError(f"num_encoders must leave at least one decoder: {self}")


@dataclass(frozen=True, eq=False)
class WorkloadStats:
    """Moments of a workload the closed form needs, computed once."""

    workload: Workload

    @cached_property
    def surv(self) -> np.ndarray:
        """P(S >= k) for k = 1..max (index k-1)."""
        return self.workload.output.survival(np.arange(1, self.s_max + 1))

    @property
    def s_max(self) -> int:
        return self.workload.output.max

    @cached_property
    def s99(self) -> int:
        return self.workload.p99_output

    @cached_property
    def mean_s(self) -> float:
        return self.workload.output.mean

    @cached_property
    def mean_in(self) -> float:
        return self.workload.input.mean

    @cached_property
    def eff_in(self) -> float:
        """sqrt(E[I^2]): the length whose square is the mean attention work of a prefill."""
        return float(np.sqrt(self.workload.input.moment(2)))

    @cached_property
    def in_decode_weighted(self) -> float:
        """E[I*S]/E[S]: the input length seen by an average decode step (length-biased)."""
        return self.workload.mean_input_times_output() / self.mean_s

    def encode_nodes(self, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Quadrature over the batch's mean input length: (means, effective lengths, weights).

        Encode cost is convex in the token count (memory-bound when short, compute-bound when
        long), so E[cost(batch)] > cost(E[batch]) for small batches. One input: 32 equal-mass
        quantile nodes of I. Several: Gauss-Hermite (9 nodes) on the batch mean, normal by the
        CLT with sd std(I)/sqrt(B). The effective (attention) length adds the expected spread
        inside the batch: sqrt(m^2 + var(I) (B-1)/B)."""
        cache = self.__dict__.setdefault("_enc_nodes", {})
        if batch not in cache:
            dist = self.workload.input
            if batch == 1:
                qs = (np.arange(32) + 0.5) / 32
                means = np.array([dist.quantile(q) for q in qs], dtype=np.float64)
                weights = np.full(32, 1 / 32)
            else:
                x, w = np.polynomial.hermite_e.hermegauss(9)
                means = np.clip(dist.mean + x * dist.std / np.sqrt(batch), dist.values[0],
                                dist.max)
                weights = w / w.sum()
            var_in = dist.std**2 * (batch - 1) / batch
            cache[batch] = (means, np.sqrt(means**2 + var_in), weights)
        return cache[batch]

    @cached_property
    def mean_age(self) -> float:
        """Average generated length at a decode step: E[S(S+1)/2]/E[S]."""
        o = self.workload.output
        return (o.moment(2) + o.mean) / 2.0 / o.mean


@dataclass(frozen=True)
class Metrics:
    """What a schedule achieves. Latencies in seconds, from the start of a request's encode."""

    feasible: bool
    reason: str
    throughput_seq_s: float
    throughput_tok_s: float
    latency_p99len_s: float  # SLA-(b): a request of the p99 output length
    latency_p99_s: float  # SLA-(a): 99th percentile over all requests
    ttft_s: float
    tpot_s: float
    B_D: float
    worker_util: tuple[float, ...]
    worker_mem_bytes: tuple[float, ...]
    mem_capacity_bytes: float
    pipelines: dict[str, Pipeline] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)

    def latency(self, sla: str) -> float:
        if sla not in ("a", "b"):
            raise ValueError(f"SLA must be 'a' or 'b', got {sla!r}")
        return self.latency_p99len_s if sla == "b" else self.latency_p99_s


def infeasible(reason: str) -> Metrics:
    return Metrics(False, reason, 0.0, 0.0, float("inf"), float("inf"), float("inf"),
                   float("inf"), 0.0, (), (), 0.0)
