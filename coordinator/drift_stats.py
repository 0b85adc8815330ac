"""Length statistics for drift detection: Kaplan-Meier with censored lengths, a one-sample
log-rank test against a planned length law, and a KS distance for integer lengths.

All three take the planned law as a ``LengthDist`` (an exact pmf over integer lengths) and,
when that law is itself estimated from ``n_ref`` samples, widen to a two-sample test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr
from scipy.stats import kstwo

from coordinator.planner.lengths import LengthDist

HAZARD_EPS = 0.01  # the reference hazard at its max length is 1 - this, not 1


@dataclass(frozen=True)
class KaplanMeier:
    """P(S >= k) for k = 1..len(surv), from exact and right-censored (S > c) lengths."""

    surv: np.ndarray  # surv[k-1] = P(S >= k)
    at_risk: np.ndarray  # at_risk[k-1] = subjects known to reach step k
    events: np.ndarray  # events[k-1] = subjects finishing at exactly k

    @classmethod
    def fit(cls, lens: np.ndarray, exact: np.ndarray, min_at_risk: int = 1) -> KaplanMeier:
        """``min_at_risk``: stop where fewer subjects are at risk (the estimate's noisy end;
        what lies beyond becomes the censored tail)."""
        top = int(lens.max(initial=0))
        counts = np.bincount(lens, minlength=top + 1)
        at_risk = (counts[::-1].cumsum()[::-1])[1:].astype(np.float64)  # lens >= k
        events = np.bincount(lens[exact], minlength=top + 1)[1:].astype(np.float64)
        top = int(np.count_nonzero(at_risk >= min_at_risk))  # at_risk is non-increasing
        at_risk, events = at_risk[:top], events[:top]
        hazard = np.divide(events, at_risk, out=np.zeros_like(events), where=at_risk > 0)
        surv = np.concatenate([[1.0], np.cumprod(1.0 - hazard)[:-1]]) if top else np.ones(0)
        return cls(surv, at_risk, events)

    @property
    def tail(self) -> float:
        """P(S > last observed step): mass the window cannot place (censored tail)."""
        if self.surv.size == 0:
            return 1.0
        return float(self.surv[-1] * (1.0 - self.events[-1] / max(self.at_risk[-1], 1.0)))

    def pmf(self, ref: LengthDist) -> tuple[np.ndarray, np.ndarray]:
        """Mass per length, the censored tail placed by the reference's conditional law
        beyond the last step (or on the next step when the reference has no mass there)."""
        top = self.surv.size
        mass = np.append(-np.diff(self.surv), self.surv[-1] - self.tail) if top else np.zeros(0)
        values, probs = np.arange(1, top + 1), mass
        beyond = ref.values > top
        if self.tail > 1e-12:
            if beyond.any() and ref.probs[beyond].sum() > 0:
                cond = ref.probs[beyond] / ref.probs[beyond].sum()
                values = np.concatenate([values, ref.values[beyond]])
                probs = np.concatenate([probs, self.tail * cond])
            else:
                values, probs = np.append(values, top + 1), np.append(probs, self.tail)
        keep = probs > 1e-12
        return values[keep], probs[keep]


def quantile(values: np.ndarray, probs: np.ndarray, q: float) -> int:
    """Smallest value whose cumulative mass reaches ``q``."""
    cdf = np.cumsum(probs) / probs.sum()
    return int(values[min(int(np.searchsorted(cdf, q - 1e-9)), values.size - 1)])


def logrank(km: KaplanMeier, ref: LengthDist, n_ref: int | None) -> tuple[float, float]:
    """One-sample log-rank z and two-sided p: observed finishes vs those the reference's
    discrete hazards predict for the same at-risk steps (z < 0: outputs longer than planned)."""
    top = km.at_risk.size
    if top == 0 or km.events.sum() == 0:
        return 0.0, 1.0
    pmf = np.zeros(max(ref.max, top))
    pmf[ref.values - 1] = ref.probs
    surv = np.concatenate([[1.0], 1.0 - np.cumsum(pmf)[:-1]])
    hazard = np.divide(pmf, surv, out=np.zeros_like(pmf), where=surv > 1e-12)
    hazard = np.minimum(hazard, 1.0 - HAZARD_EPS)
    # past the law's max a request is unlikely, not impossible: an exponential tail of mean
    # max, so one stray long request cannot fire the test on its own
    hazard[ref.max:] = 1.0 / ref.max
    hazard = hazard[:top]
    expected = float(km.at_risk @ hazard)
    var = float(km.at_risk @ (hazard * (1 - hazard)))
    n = float(km.at_risk[0])
    if n_ref:
        var *= 1.0 + n / n_ref  # the reference is an estimate too: two-sample variance
    z = (float(km.events.sum()) - expected) / math.sqrt(max(var, 1e-12))
    return z, float(2 * ndtr(-abs(z)))


def ks_distance(sample: np.ndarray, ref: LengthDist, n_ref: int | None) -> tuple[float, float]:
    """KS distance of integer samples to a discrete law, and its p-value (conservative for
    discrete laws; n_ref: two-sample effective size n m / (n + m))."""
    grid = np.union1d(ref.values, sample)
    emp = np.searchsorted(np.sort(sample), grid, side="right") / sample.size
    ref_cdf = np.concatenate([[0.0], np.cumsum(ref.probs)])[
        np.searchsorted(ref.values, grid, side="right")]
    d = float(np.max(np.abs(emp - ref_cdf)))
    n = sample.size * n_ref / (sample.size + n_ref) if n_ref else sample.size
    return d, float(kstwo.sf(d, max(int(round(n)), 1)))
