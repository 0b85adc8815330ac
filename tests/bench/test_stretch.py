"""CPU stretch: the workers' compute on the wall over its CPU time, and the error at a run's
own load."""

from __future__ import annotations

import time

import pytest

from common.busyclock import BusyClock
from coordinator.bench.stretch import (
    at_run_load,
    calibration_stretch,
    errors_at_run_load,
    run_stretch,
    worker_busy,
)


def test_the_busy_clock_tells_waiting_from_computing() -> None:
    clock = BusyClock()
    with clock.timing():
        time.sleep(0.05)  # off the CPU: wall only
    assert clock.wall_s >= 0.05 and clock.cpu_s < 0.02
    spin = BusyClock()
    with spin.timing():
        end = time.thread_time() + 0.05
        while time.thread_time() < end:
            pass
    # two different clocks: the CPU clock can read a hair past the wall one (seen: 50.033 ms
    # of CPU in 50.025 ms of wall)
    assert spin.cpu_s >= 0.05 and spin.wall_s >= 0.95 * spin.cpu_s
    with pytest.raises(RuntimeError), clock.timing():  # a failed pass still counts
        raise RuntimeError("boom")
    assert set(clock.load()) == {"busy_s", "busy_cpu_s"}


def test_run_and_calibration_stretch_from_the_workers_loads() -> None:
    stats = {"workers": [
        {"worker_id": "enc0", "load": {"busy_s": 6.0, "busy_cpu_s": 5.0, "batches_done": 10}},
        {"worker_id": "dec0", "load": {"busy_s": 9.0, "busy_cpu_s": 7.0, "steps": 300}},
        {"worker_id": "old", "load": {"busy_s": 1.0}}]}  # a worker without a CPU clock
    workers = worker_busy(stats)
    assert [w["passes"] for w in workers] == [10, 300, None]
    assert workers[0]["cpu_stretch"] == pytest.approx(1.2)
    assert run_stretch(workers) == pytest.approx(15.0 / 12.0)  # summed, not averaged
    assert run_stretch(worker_busy({})) is None
    assert calibration_stretch([{"cpu_stretch": 1.1}, {"cpu_stretch": 1.5},
                                {"cpu_stretch": 1.2}, {"cpu_stretch": None}]) == 1.2
    assert calibration_stretch([]) is None


def test_errors_at_the_runs_own_load() -> None:
    predicted = {"throughput_seq_s": 4.0, "throughput_tok_s": 120.0, "latency_p99len_s": 5.0,
                 "latency_p99_s": 6.0, "ttft_s": 0.5, "tpot_s": 0.06}
    slow = at_run_load(predicted, 1.25)
    assert slow["throughput_seq_s"] == pytest.approx(3.2)
    assert slow["latency_p99len_s"] == pytest.approx(6.25)
    assert predicted["throughput_seq_s"] == 4.0  # not modified
    # the run was 25% more contended than the calibration and measured exactly that
    measured = {**slow, "cpu_stretch": 1.5}
    err = errors_at_run_load(predicted, measured, reference=1.2)
    assert err is not None and err["ratio"] == pytest.approx(1.25)
    assert err["throughput_seq_s"] == pytest.approx(0.0, abs=1e-12)
    assert err["latency_p99len_s"] == pytest.approx(0.0, abs=1e-12)
    assert errors_at_run_load(predicted, measured, reference=None) is None
    assert errors_at_run_load(predicted, {"cpu_stretch": None}, reference=1.2) is None
