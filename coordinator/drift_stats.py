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
    censored_beyond: int = 0  # in-flight (censored) subjects past the last step kept
    exact_beyond: np.ndarray | None = None  # finished lengths past it (the re-plan's tail)

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
        past = lens > top
        return cls(surv, at_risk, events, int(np.count_nonzero(~exact & past)),
                   lens[exact & past])

    @property
    def tail(self) -> float:
        """P(S > last observed step): mass the window cannot place (censored tail)."""
        if self.surv.size == 0:
            return 1.0
        return float(self.surv[-1] * (1.0 - self.events[-1] / max(self.at_risk[-1], 1.0)))

    def pmf(self, ref: LengthDist, extrapolate: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Mass per length, the censored tail placed by the reference's conditional law
        beyond the last step (or on the next step when the reference has no mass there).
        ``extrapolate`` (the re-plan's law): the tail is placed by whichever of that and a
        geometric tail (``tail_hazard``) has the longer conditional mean: after a shift toward
        longer outputs the reference knows nothing of the new tail (docs/adaptation.md).
        Only when some of the tail is still in flight; when all of it finished, the re-plan's
        tail is those lengths as seen (a reference's tail, e.g. an earlier extrapolation, must
        not outlive the evidence)."""
        top = self.surv.size
        mass = np.append(-np.diff(self.surv), self.surv[-1] - self.tail) if top else np.zeros(0)
        values, probs = np.arange(1, top + 1), mass
        beyond = ref.values > top
        if self.tail > 1e-12:
            if beyond.any() and ref.probs[beyond].sum() > 0:
                tail_v = ref.values[beyond]
                tail_p = ref.probs[beyond] / ref.probs[beyond].sum()
            else:
                tail_v, tail_p = np.array([top + 1]), np.array([1.0])
            hazard = self.tail_hazard() if extrapolate and self.censored_beyond else None
            known = self.exact_beyond
            if extrapolate and not self.censored_beyond and known is not None and known.size:
                tail_v, counts = np.unique(known, return_counts=True)  # all finished: as seen
                tail_p = counts / counts.sum()
            if hazard is not None:
                geo_v, geo_p = geometric_tail(top, hazard)
                if geo_v @ geo_p > tail_v @ tail_p:
                    tail_v, tail_p = geo_v, geo_p
            values = np.concatenate([values, tail_v])
            probs = np.concatenate([probs, self.tail * tail_p])
        keep = probs > 1e-12
        return values[keep], probs[keep]

    def tail_hazard(self, z: float = 1.0) -> float | None:
        """Finishes per token beyond the last step, fitted to the upper half of the observed
        steps at its lower ``z``-sigma bound (Poisson count of finishes): a smaller hazard is
        a longer tail, the cautious side for a latency bound. None: nothing at risk there."""
        top = self.surv.size
        if top == 0:
            return None
        events, risk = self.events[top // 2:].sum(), self.at_risk[top // 2:].sum()
        if risk <= 0:
            return None
        return float(min(max(events - z * math.sqrt(events), 0.5) / risk, 0.5))


TAIL_QUANTILE = 0.99  # the geometric tail is cut at its 99th percentile (the rest: there)
TAIL_MAX_FACTOR = 2  # ... and at 2x the last observed step (the planner sizes N_D, KV by it)


def geometric_tail(top: int, hazard: float) -> tuple[np.ndarray, np.ndarray]:
    """Lengths top+1, top+2, ... with P = h (1-h)^(j-1), cut at the TAIL_QUANTILE point (or
    TAIL_MAX_FACTOR x top) where the remaining mass is put; sums to 1."""
    span = math.ceil(math.log(1.0 - TAIL_QUANTILE) / math.log(1.0 - hazard))
    span = max(1, min(span, (TAIL_MAX_FACTOR - 1) * max(top, 1)))
    j = np.arange(1, span + 1)
    probs = hazard * (1.0 - hazard) ** (j - 1)
    probs[-1] += 1.0 - probs.sum()
    return top + j, probs


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
