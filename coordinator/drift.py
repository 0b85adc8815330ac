"""Workload drift: is the traffic still the length distribution the plan was made for?

A plan is tuned to a law of (input length I, output length S); its latency depends on the p99
output length and its throughput on the means (the paper: +15% mean output needs a ~13%
tighter bound to stay safe). This module watches the traffic and says when the law moved.

    arrivals ---> LengthWindow (last ``window`` arrivals: input length; output length once
                  finished, else the tokens produced so far = a right-censored observation)
                        |
                        v  every ``eval_every`` arrivals
    DriftDetector.evaluate: input  KS distance vs the reference law      (one/two-sample)
                            output one-sample log-rank vs the reference hazards (censoring-aware)
                                   + Kaplan-Meier mean and p99 (the effect sizes)
                        |
                        v
    STABLE --over--> SUSPECT --over x confirm--> FIRED (dwell) --rebase()--> COOLDOWN --> STABLE
              <--clear--'                                                  (min dwell time and
                                                                           arrivals passed)

"over" = a test rejects at ``alpha`` AND the effect is material (|mean shift| or |p99 shift|
over its threshold); "clear" = every effect under ``clear_ratio`` x its threshold (hysteresis).
Why censoring matters: after a shift to longer outputs the first requests to *finish* are the
short ones, so a window of finished requests alone sees the shift late and understated; the
in-flight requests' token counts (S > k) carry the news first. Why a material-effect gate: with
a large window a 2% shift is "significant" but costs nothing; with a small one a 20% jump can
be noise. Thresholds and their reasons: docs/adaptation.md.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from coordinator.drift_stats import KaplanMeier, ks_distance, logrank, quantile
from coordinator.planner.lengths import LengthDist
from coordinator.planner.workload import Workload

MIN_AT_RISK = 10  # the Kaplan-Meier effect sizes stop where fewer requests are at risk


@dataclass(frozen=True)
class DriftConfig:
    """Detector thresholds (defaults justified in docs/adaptation.md)."""

    window: int = 256  # arrivals kept
    min_samples: int = 64  # arrivals in the window before any verdict
    eval_every: int = 8  # arrivals between evaluations
    alpha: float = 1e-5  # significance of each test (many overlapping windows are tested)
    mean_shift: float = 0.15  # relative change of the mean output length that matters
    p99_shift: float = 0.15  # relative change of the p99 output length that matters
    input_mean_shift: float = 0.25  # relative change of the mean input length that matters
    clear_ratio: float = 0.5  # SUSPECT clears when every effect is under this x threshold
    confirm: int = 3  # consecutive "over" evaluations before firing
    min_dwell_s: float = 10.0  # after a fire: no new fire for this long ...
    min_dwell_requests: int = 128  # ... and until this many more arrivals
    relayout: int = 1  # 1: a plan with other pipeline stages is re-laid out live; 0: knobs only
    drain_timeout_s: float = 2.0  # re-layout: old stages drain this long, then migrate
    # relative change of the measured / predicted time per output token since the plan went
    # live beyond which a re-plan uses a profile corrected by that change (adapt_replan)
    ratio_shift: float = 0.2

    def __post_init__(self) -> None:
        if self.window < 8 or not 8 <= self.min_samples <= self.window:
            raise ValueError("need window >= 8 and 8 <= min_samples <= window")
        if self.eval_every < 1 or self.confirm < 1 or self.min_dwell_requests < 0:
            raise ValueError("eval_every and confirm must be >= 1, min_dwell_requests >= 0")
        if not 0 < self.alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {self.alpha}")
        for name in ("mean_shift", "p99_shift", "input_mean_shift", "ratio_shift"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 (a relative change, e.g. 0.15)")
        if not 0 < self.clear_ratio < 1 or self.min_dwell_s < 0:
            raise ValueError("need 0 < clear_ratio < 1 and min_dwell_s >= 0")
        if self.relayout not in (0, 1) or self.drain_timeout_s < 0:
            raise ValueError("relayout must be 0 or 1 and drain_timeout_s >= 0")

    @classmethod
    def parse(cls, text: str | None) -> DriftConfig:
        """``"window=128,alpha=1e-3,..."`` (the ``--adapt-options`` flag); empty: defaults."""
        if not text:
            return cls()
        kinds = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key.strip() not in kinds:
                raise ValueError(f"bad adapt option {part!r}; options: {', '.join(kinds)}")
            conv = int if kinds[key.strip()] in (int, "int") else float
            try:
                values[key.strip()] = conv(value)
            except ValueError as exc:
                raise ValueError(f"adapt option {key.strip()} needs a number, got {value!r}"
                                 ) from exc
        return cls(**values)


@dataclass(frozen=True, eq=False)
class Reference:
    """The law the plan assumes. ``n_*`` = sample size when the law is itself an estimate (a
    trace, an observed window): the tests then widen by the reference's own noise."""

    input: LengthDist
    output: LengthDist
    n_input: int | None = None
    n_output: int | None = None

    @classmethod
    def from_workload(cls, workload: Workload, n: int | None = None) -> Reference:
        if n is None and workload.pairs is not None:
            n = int(workload.pairs.shape[0])
        return cls(workload.input, workload.output, n, n)


@dataclass
class _Entry:
    key: str
    input_len: int
    progress: Callable[[], int] | None  # tokens so far of an in-flight request
    output_len: int = 0
    finished: bool = False  # output_len is the exact length (an event), not a lower bound


class LengthWindow:
    """The last ``size`` arrivals: input lengths, and output lengths exact or censored."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: deque[_Entry] = deque()
        self._live: dict[str, _Entry] = {}
        self.arrivals = 0

    def arrive(self, key: str, input_len: int, progress: Callable[[], int] | None) -> None:
        entry = _Entry(key, int(input_len), progress)
        self._entries.append(entry)
        self._live[key] = entry
        self.arrivals += 1
        if len(self._entries) > self.size:
            old = self._entries.popleft()
            if self._live.get(old.key) is old:
                del self._live[old.key]

    def finish(self, key: str, output_len: int, exact: bool = True) -> None:
        """``exact`` False (failed, cancelled): the length is only known to exceed it."""
        entry = self._live.pop(key, None)
        if entry is None:
            return  # left the window already
        entry.output_len, entry.finished, entry.progress = int(output_len), exact, None

    def __len__(self) -> int:
        return len(self._entries)

    def inputs(self) -> np.ndarray:
        return np.fromiter((e.input_len for e in self._entries), np.int64, len(self._entries))

    def outputs(self) -> tuple[np.ndarray, np.ndarray]:
        """(length, exact) per arrival; in-flight ones report their tokens so far."""
        lens = np.array([e.output_len if e.progress is None else e.progress()
                         for e in self._entries], dtype=np.int64)
        exact = np.array([e.finished for e in self._entries], dtype=bool)
        return lens, exact


def _rel(new: float, old: float) -> float:
    return (new - old) / old if old > 0 else 0.0


@dataclass(frozen=True)
class Observation:
    """One evaluation: observed vs reference summaries, test statistics, effect sizes."""

    num: int
    input: dict[str, float]
    output: dict[str, float]
    effects: dict[str, float]  # relative shifts: mean_output, p99_output, mean_input
    ks_input: float
    p_input: float
    z_output: float
    p_output: float
    observed_output: tuple[np.ndarray, np.ndarray] = field(repr=False)
    # the re-plan's output law: the censored tail extrapolated (KaplanMeier.pmf(extrapolate))
    replan_output: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"num": self.num, "input": self.input, "output": self.output,
                "effects": self.effects, "ks_input": self.ks_input, "p_input": self.p_input,
                "z_output": self.z_output, "p_output": self.p_output}


def observe(window: LengthWindow, ref: Reference) -> Observation:
    """Summaries and tests of the window against the reference (pure; no state)."""
    inputs = window.inputs()
    lens, exact = window.outputs()
    km = KaplanMeier.fit(lens, exact, MIN_AT_RISK)
    values, probs = km.pmf(ref.output)
    mean_out = float(values @ probs) if probs.size else 0.0
    p99 = quantile(values, probs, 0.99) if probs.size else 0
    ks, p_in = ks_distance(inputs, ref.input, ref.n_input)
    z, p_out = logrank(KaplanMeier.fit(lens, exact), ref.output, ref.n_output)
    obs_in = {"mean": float(inputs.mean()), "p50": float(np.percentile(inputs, 50)),
              "p99": float(np.percentile(inputs, 99))}
    obs_out = {"mean": mean_out, "p50": float(quantile(values, probs, 0.5)) if probs.size
               else 0.0, "p99": float(p99), "finished": int(exact.sum()),
               "in_flight": int((~exact).sum()), "censored_tail": km.tail}
    effects = {"mean_output": _rel(mean_out, ref.output.mean),
               "p99_output": _rel(p99, ref.output.quantile(0.99)),
               "mean_input": _rel(obs_in["mean"], ref.input.mean)}
    return Observation(inputs.size, obs_in, obs_out, effects, ks, p_in, z, p_out,
                       (values, probs), km.pmf(ref.output, extrapolate=True))


def summary(dist: LengthDist) -> dict[str, float]:
    return {"mean": dist.mean, "p50": float(dist.quantile(0.5)), "p99": float(dist.quantile(0.99))}


class DriftDetector:
    """The state machine of the module docstring; ``evaluate`` is cheap (numpy over the
    window), so the coordinator runs it on its event loop."""

    def __init__(self, reference: Reference, cfg: DriftConfig | None = None) -> None:
        self.cfg = cfg or DriftConfig()
        self.reference = reference
        self.window = LengthWindow(self.cfg.window)
        self.state = "stable"
        self.last: Observation | None = None
        self.reasons: list[str] = []
        self._over = 0
        self._evaluated_at = 0
        self._suspect_since: tuple[float, int] | None = None
        self._dwell_until: tuple[float, int] = (-math.inf, 0)
        self.fired_at: tuple[float, int] | None = None

    def due(self) -> bool:
        return (len(self.window) >= self.cfg.min_samples
                and self.window.arrivals - self._evaluated_at >= self.cfg.eval_every)

    def evaluate(self, now: float) -> bool:
        """Test the window; True exactly when drift fires (then re-plan and ``rebase``)."""
        self._evaluated_at = self.window.arrivals
        self.last = obs = observe(self.window, self.reference)
        over, clear, reasons = self._verdict(obs)
        if self.state in ("fired", "cooldown"):
            if self.state == "cooldown" and now >= self._dwell_until[0] \
                    and self.window.arrivals >= self._dwell_until[1]:
                self.state, self._over = "stable", 0
            return False
        if over:
            self._over += 1
            if self._suspect_since is None:
                self._suspect_since = (now, self.window.arrivals)
            self.state = "suspect"
            if self._over >= self.cfg.confirm:
                self.state, self.reasons = "fired", reasons
                self.fired_at = (now, self.window.arrivals)
                self._dwell_until = (now + self.cfg.min_dwell_s,
                                     self.window.arrivals + self.cfg.min_dwell_requests)
                return True
        elif clear or self.state == "stable":
            self.state, self._over, self._suspect_since = "stable", 0, None
        return False

    def _verdict(self, obs: Observation) -> tuple[bool, bool, list[str]]:
        cfg, eff = self.cfg, obs.effects
        limits = {"mean_output": cfg.mean_shift, "p99_output": cfg.p99_shift,
                  "mean_input": cfg.input_mean_shift}
        significant = {"mean_output": obs.p_output < cfg.alpha,
                       "p99_output": obs.p_output < cfg.alpha,
                       "mean_input": obs.p_input < cfg.alpha}
        reasons = [f"{name} {eff[name]:+.0%} (limit {lim:.0%}, p="
                   f"{obs.p_input if name == 'mean_input' else obs.p_output:.1e})"
                   for name, lim in limits.items()
                   if significant[name] and abs(eff[name]) >= lim]
        clear = all(abs(eff[name]) < cfg.clear_ratio * lim for name, lim in limits.items())
        return bool(reasons), clear, reasons

    @property
    def suspect_since(self) -> tuple[float, int] | None:
        return self._suspect_since

    def rebase(self, reference: Reference, now: float) -> None:
        """Adopt the new plan's law; no new fire before the dwell has passed."""
        self.reference, self.state = reference, "cooldown"
        self._over, self._suspect_since = 0, None
        self._dwell_until = (max(self._dwell_until[0], now + self.cfg.min_dwell_s),
                             max(self._dwell_until[1],
                                 self.window.arrivals + self.cfg.min_dwell_requests))

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state, "reasons": self.reasons,
                               "planned": {"input": summary(self.reference.input),
                                           "output": summary(self.reference.output)},
                               "window": len(self.window), "arrivals": self.window.arrivals}
        if self.last is not None:
            out["observed"] = self.last.to_dict()
        return out


def observed_spec(obs: Observation, window: LengthWindow, digits: int = 4) -> str:
    """The observed law as an inline workload spec (``hist:`` laws) the planner parses."""
    ins, counts = np.unique(window.inputs(), return_counts=True)
    values, probs = obs.replan_output or obs.observed_output
    hist_in = ",".join(f"{v}:{c}" for v, c in zip(ins, counts, strict=True))
    hist_out = ",".join(f"{v}:{p:.{digits}g}" for v, p in zip(values, probs, strict=True)
                        if float(f"{p:.{digits}g}") > 0)
    return f"name=observed;in=hist:{hist_in};out=hist:{hist_out}"
