"""Calibration: the wall/CPU factor from baseline runs scales every profiled time."""

from __future__ import annotations

import pytest

from common.models.config import ModelConfig
from coordinator.bench.calibrate import contention_factor, scaled_profile
from coordinator.planner.analytic import analytic_profile
from coordinator.planner.candidate import Candidate
from coordinator.planner.simulator import simulate
from coordinator.planner.workload import parse_workload


def test_factor_is_the_median_tpot_ratio() -> None:
    base = [{"tpot_s": 0.4, "predicted_tpot_s": 0.1}, {"tpot_s": 0.3, "predicted_tpot_s": 0.1},
            {"tpot_s": 0.5, "predicted_tpot_s": 0.1}, {"tpot_s": None, "predicted_tpot_s": 0.1}]
    assert contention_factor(base) == pytest.approx(4.0)
    assert contention_factor([{"tpot_s": None}]) is None


def test_scaled_profile_scales_the_predictions() -> None:
    profile = analytic_profile("a40", ModelConfig.preset("opt-13b"), "float16")
    slow = scaled_profile(profile, 3.0, "test")
    assert slow.meta["calibration"] == {"factor": 3.0, "source": "test"}
    assert "calibration" not in profile.meta  # the original is untouched
    wl = parse_workload("S")
    for cand in (Candidate("static", 4, 1, 0, 8), Candidate("rra", 4, 1, 0, 16, 8)):
        a, b = simulate(cand, wl, profile), simulate(cand, wl, slow)
        assert b.latency_p99len_s == pytest.approx(3 * a.latency_p99len_s)
        assert b.throughput_seq_s == pytest.approx(a.throughput_seq_s / 3)
    with pytest.raises(ValueError, match="> 0"):
        scaled_profile(profile, 0.0, "test")
