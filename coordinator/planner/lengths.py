"""Discrete length distributions: every planner computation runs on an exact pmf over integers.

A sequence length is an integer, so each distribution is stored as a probability mass function
over ``1..max_len``. Expectations the simulator needs (E[S], E[ceil(S/N_D)], quantiles, the
expected maximum of B draws) are then exact sums, not Monte-Carlo estimates, and the
discrete-event simulator samples from the very same pmf.

The paper's task presets give "avg, std, max" of a normal truncated at 0 and max. Its p99 column
is only reproduced when avg/std are the moments *of the truncated distribution* (the underlying
normal has a lower mean and a wider spread), so :func:`truncated_normal` solves for the
underlying (mu, sigma) that give the stated moments. See docs/planner.md, "Workloads".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy.optimize import fsolve
from scipy.special import ndtr


@dataclass(frozen=True, eq=False)
class LengthDist:
    """A pmf over lengths ``values`` (sorted, positive ints); ``spec`` is how it was described."""

    values: np.ndarray
    probs: np.ndarray
    spec: str
    _cdf: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        values = np.asarray(self.values, dtype=np.int64)
        probs = np.asarray(self.probs, dtype=np.float64)
        if values.ndim != 1 or values.shape != probs.shape or values.size == 0:
            raise ValueError("a length distribution needs equally long, non-empty values/probs")
        if values.min() < 1:
            raise ValueError(f"lengths must be >= 1 token, got {values.min()} in {self.spec!r}")
        if np.any(np.diff(values) <= 0):
            raise ValueError("length values must be strictly increasing")
        if np.any(probs < 0) or probs.sum() <= 0:
            raise ValueError(f"probabilities must be >= 0 with a positive sum in {self.spec!r}")
        probs = probs / probs.sum()
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "probs", probs)
        object.__setattr__(self, "_cdf", np.cumsum(probs))

    @property
    def mean(self) -> float:
        return float(self.values @ self.probs)

    @property
    def std(self) -> float:
        return float(np.sqrt(max(self.moment(2) - self.mean**2, 0.0)))

    @property
    def max(self) -> int:
        return int(self.values[-1])

    def moment(self, k: int) -> float:
        return float((self.values.astype(np.float64) ** k) @ self.probs)

    def quantile(self, q: float) -> int:
        """Smallest length whose cdf reaches ``q`` (the p99 output length for q=0.99)."""
        if not 0.0 < q <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {q}")
        idx = int(np.searchsorted(self._cdf, q - 1e-12, side="left"))
        return int(self.values[min(idx, self.values.size - 1)])

    def expect(self, fn: np.ndarray) -> float:
        """E[fn(L)] for fn given as an array aligned with ``values``."""
        return float(np.asarray(fn, dtype=np.float64) @ self.probs)

    def survival(self, lengths: np.ndarray) -> np.ndarray:
        """P(L >= k) for each k in ``lengths``."""
        idx = np.searchsorted(self.values, np.asarray(lengths), side="left")
        below = np.concatenate([[0.0], self._cdf])[idx]
        return 1.0 - below

    def expected_max(self, num: int) -> float:
        """E[max of ``num`` independent draws]: the decode steps of a static batch."""
        cdf_prev = np.concatenate([[0.0], self._cdf[:-1]])
        gaps = np.diff(np.concatenate([[0], self.values]))
        return float(np.sum(gaps * (1.0 - cdf_prev**num)))

    def max_quantile(self, num: int, q: float) -> int:
        """q-quantile of the maximum of ``num`` draws (P(max <= k) = F(k)^num)."""
        idx = int(np.searchsorted(self._cdf**num, q - 1e-12, side="left"))
        return int(self.values[min(idx, self.values.size - 1)])

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return rng.choice(self.values, size=size, p=self.probs)


def fixed(n: int) -> LengthDist:
    return LengthDist(np.array([n]), np.array([1.0]), f"fixed:{n}")


def uniform(lo: int, hi: int) -> LengthDist:
    if not 1 <= lo <= hi:
        raise ValueError(f"uniform:{lo},{hi} needs 1 <= lo <= hi")
    values = np.arange(lo, hi + 1)
    return LengthDist(values, np.ones(values.size), f"uniform:{lo},{hi}")


def empirical(samples: np.ndarray, spec: str = "empirical") -> LengthDist:
    """A histogram of observed lengths (one bin per distinct integer length)."""
    samples = np.asarray(samples, dtype=np.int64)
    if samples.size == 0:
        raise ValueError("an empirical distribution needs at least one sample")
    values, counts = np.unique(samples, return_counts=True)
    return LengthDist(values, counts.astype(np.float64), spec)


def _rounded_normal_pmf(mu: float, sigma: float, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Integers lo..hi, each getting the normal mass that rounds to it (cut at lo and hi)."""
    values = np.arange(lo, hi + 1)
    edges = (np.arange(lo, hi + 2) - 0.5 - mu) / sigma
    mass = np.diff(ndtr(edges))
    return values, mass / mass.sum()


@lru_cache(maxsize=256)
def _solve_underlying(mean: float, std: float, lo: int, hi: int) -> tuple[float, float]:
    """(mu, sigma) of the normal whose truncated, rounded pmf has the given mean and std."""

    def residual(x: np.ndarray) -> list[float]:
        mu, log_sigma = float(x[0]), float(x[1])
        values, probs = _rounded_normal_pmf(mu, float(np.exp(log_sigma)), lo, hi)
        m = float(values @ probs)
        s = float(np.sqrt(max((values.astype(float) ** 2) @ probs - m * m, 1e-12)))
        return [m - mean, s - std]

    solution, _, status, _ = fsolve(residual, [mean, np.log(std)], full_output=True)
    if status != 1 or max(abs(r) for r in residual(solution)) > 1e-3 * max(std, 1.0):
        raise ValueError(
            f"no truncated normal on [{lo}, {hi}] has mean {mean} and std {std}; "
            "lower the std or widen the range"
        )
    return float(solution[0]), float(np.exp(solution[1]))


def truncated_normal(mean: float, std: float, max_len: int, min_len: int = 1) -> LengthDist:
    """Integer lengths in [min_len, max_len] from a normal truncated there, with the truncated
    distribution's own mean and std equal to ``mean`` and ``std`` (the paper's convention).
    When no truncated normal reaches that std, N(mean, std) is cut to the range instead."""
    if not (min_len <= mean <= max_len) or std < 0:
        raise ValueError(
            f"normal:{mean},{std},{max_len} needs {min_len} <= mean <= max and std >= 0"
        )
    spec = f"normal:{mean:g},{std:g},{max_len}"
    if std == 0:
        return LengthDist(np.array([round(mean)]), np.array([1.0]), spec)
    try:
        mu, sigma = _solve_underlying(float(mean), float(std), int(min_len), int(max_len))
    except ValueError:
        # std close to the half-range (the paper's S and C2 inputs): no truncated normal has
        # these moments, so take N(mean, std) itself cut to the range (a flatter law).
        mu, sigma = float(mean), float(std)
    values, probs = _rounded_normal_pmf(mu, sigma, min_len, max_len)
    return LengthDist(values, probs, spec)


def parse_dist(text: str) -> LengthDist:
    """``normal:AVG,STD,MAX`` | ``uniform:LO,HI`` | ``fixed:N`` | ``hist:LEN:COUNT,LEN:COUNT``."""
    kind, _, args = text.strip().partition(":")
    try:
        if kind == "normal":
            avg, std, mx = (float(a) for a in args.split(","))
            return truncated_normal(avg, std, int(mx))
        if kind == "uniform":
            lo, hi = (int(a) for a in args.split(","))
            return uniform(lo, hi)
        if kind == "fixed":
            return fixed(int(args))
        if kind == "hist":
            pairs = [p.split(":") for p in args.split(",")]
            values = np.array([int(v) for v, _ in pairs])
            order = np.argsort(values)
            counts = np.array([float(c) for _, c in pairs])
            return LengthDist(values[order], counts[order], text.strip())
    except (TypeError, ValueError) as exc:
        if "needs" in str(exc) or "truncated normal" in str(exc):
            raise
        raise ValueError(f"cannot parse length distribution {text!r}: {exc}") from exc
    raise ValueError(
        f"unknown length distribution {text!r}; use normal:AVG,STD,MAX, uniform:LO,HI, "
        "fixed:N or hist:LEN:COUNT,..."
    )
