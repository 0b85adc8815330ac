"""The re-plan's output law after a shift toward longer outputs: the censored tail extrapolated.

A window right after the shift: the old law's short requests finished, most of the new law's
long ones still in flight (the bench's case: 189 of 256 in flight). Placing the censored tail by
the old reference (which has nothing that long) understates the p99; the geometric tail fitted
to the upper hazards at their lower bound must not, and must leave an uncensored window alone.
"""

from __future__ import annotations

import numpy as np

from coordinator.drift import LengthWindow, Reference, observe, observed_spec
from coordinator.drift_stats import KaplanMeier, geometric_tail, quantile
from coordinator.planner.workload import parse_workload

OLD = "name=s;in=normal:32,8,64;out=normal:8,3,20"
NEW_OUT = (32.0, 16.0, 80)  # mean, std, max of the new law (p99 ~72)


def _shifted_window(seed: int, elapsed: int) -> tuple[LengthWindow, np.ndarray]:
    """64 finished old requests, 192 new ones: each started 0..elapsed tokens ago."""
    rng = np.random.default_rng(seed)
    win = LengthWindow(256)
    for i in range(64):
        win.arrive(f"o{i}", 32, None)
        win.finish(f"o{i}", int(np.clip(rng.normal(8, 3), 1, 20)))
    truth = np.clip(np.rint(rng.normal(NEW_OUT[0], NEW_OUT[1], 192)), 1, NEW_OUT[2]).astype(int)
    for i, length in enumerate(truth):
        age = int(elapsed * (1 - i / 192))  # arrivals in order: the first are the oldest
        done = min(age, int(length))
        win.arrive(f"n{i}", 32, (lambda d=done: d))
        if done >= length:
            win.finish(f"n{i}", int(length))
    return win, truth


def _p99(spec: str) -> int:
    return int(parse_workload(spec).output.quantile(0.99))


def test_extrapolated_tail_is_longer_after_a_shift_to_long_outputs() -> None:
    ref = Reference.from_workload(parse_workload(OLD))
    for seed in range(5):
        win, truth = _shifted_window(seed, elapsed=40)
        obs = observe(win, ref)
        assert obs.output["censored_tail"] > 0.1  # the case: much of the window in flight
        old_way = quantile(*obs.observed_output, 0.99)  # the tail placed by the reference
        new_way = _p99(observed_spec(obs, win))
        true_p99 = np.percentile(np.concatenate([np.full(64, 8), truth]), 99)
        assert new_way > old_way, (seed, new_way, old_way)
        assert new_way >= 0.8 * true_p99, (seed, new_way, true_p99)


def test_no_censoring_no_extrapolation() -> None:
    rng = np.random.default_rng(0)
    lens = np.clip(np.rint(rng.normal(20, 5, 256)), 1, 40).astype(np.int64)
    km = KaplanMeier.fit(lens, np.ones(lens.size, bool), 10)
    ref = parse_workload(OLD).output
    values, probs = km.pmf(ref, extrapolate=True)
    assert km.tail > 0  # the few longest are past the at-risk cut ...
    # ... but they finished: the re-plan's law is exactly the lengths seen
    seen, counts = np.unique(lens, return_counts=True)
    assert np.array_equal(values, seen) and np.allclose(probs, counts / counts.sum())


def test_geometric_tail_sums_to_one_and_is_capped() -> None:
    values, probs = geometric_tail(40, 0.001)  # nearly no finishes seen: capped at 2x top
    assert values[0] == 41 and values[-1] == 80 and abs(probs.sum() - 1) < 1e-12
    values, probs = geometric_tail(40, 0.2)
    assert values[-1] - 40 == int(np.ceil(np.log(0.01) / np.log(0.8)))
