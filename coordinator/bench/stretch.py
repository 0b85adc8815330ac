"""How much longer the workers' compute took on the wall than on the CPU, per run.

Each worker times its compute twice (`common/busyclock.py`): wall seconds and the compute
thread's CPU seconds. Their ratio over a run, the run's **CPU stretch**, is 1.0 when every
worker had a core to itself and grows as other processes take CPU from them. The profile is
CPU time, so the calibration's compute factor holds the stretch of the baseline runs it was
fitted on; a run made while the machine was busier (or quieter) is slower (or faster) by
``stretch(run) / stretch(calibration)`` for reasons no schedule model sees. The bench
reports the planner's error as measured and, beside it, against the prediction scaled by
that ratio (``error_at_run_load``): what is left there is the model's error, not the
machine's.
"""

from __future__ import annotations

import statistics
from typing import Any

from coordinator.bench.measure import relative_errors

SLOWER = ("latency_p99len_s", "latency_p99_s", "ttft_s", "tpot_s")  # x ratio
FASTER = ("throughput_seq_s", "throughput_tok_s")  # / ratio


def worker_busy(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """Each worker's compute time (wall and CPU, cumulative since start, warm-up included)
    and passes/steps, from the coordinator's stats: where the time went."""
    out = []
    for w in stats.get("workers") or []:
        load = w.get("load") or {}
        busy, cpu = load.get("busy_s"), load.get("busy_cpu_s")
        passes = load.get("passes") or load.get("steps") or load.get("batches_done")
        out.append({"worker_id": w.get("worker_id"), "busy_s": busy, "busy_cpu_s": cpu,
                    "passes": passes,
                    "busy_per_pass_s": busy / passes if busy is not None and passes else None,
                    "cpu_stretch": busy / cpu if busy is not None and cpu else None})
    return out


def run_stretch(workers: list[dict[str, Any]]) -> float | None:
    """The run's CPU stretch: all workers' compute wall seconds over their CPU seconds (None:
    the workers did not report both)."""
    pairs = [(w["busy_s"], w["busy_cpu_s"]) for w in workers
             if w.get("busy_s") is not None and w.get("busy_cpu_s")]
    cpu = sum(c for _, c in pairs)
    return sum(b for b, _ in pairs) / cpu if cpu > 0 else None


def calibration_stretch(baseline: list[dict[str, Any]]) -> float | None:
    """The median CPU stretch of the baseline runs the calibration was fitted on."""
    values = [b["cpu_stretch"] for b in baseline if b.get("cpu_stretch")]
    return statistics.median(values) if values else None


def at_run_load(predicted: dict[str, Any], ratio: float) -> dict[str, Any]:
    """``predicted`` with times x ``ratio`` and rates / ``ratio``."""
    out = dict(predicted)
    for key in (*SLOWER, "latency_to_p99_token_s"):
        if isinstance(out.get(key), int | float):
            out[key] = out[key] * ratio
    for key in FASTER:
        if isinstance(out.get(key), int | float):
            out[key] = out[key] / ratio
    return out


def errors_at_run_load(predicted: dict[str, Any], measured: dict[str, Any],
                       reference: float | None) -> dict[str, Any] | None:
    """The relative errors against the prediction scaled by this run's CPU stretch over the
    calibration's, with the ratio (None: a stretch is unknown)."""
    run = measured.get("cpu_stretch")
    if not run or not reference:
        return None
    ratio = run / reference
    return {"ratio": ratio, **relative_errors(at_run_load(predicted, ratio), measured)}
