"""Calibrating the profile to the machine as it is during the bench.

A measured profile times each layer in CPU time of one thread (`meta.compute_clock` = "cpu"),
so it does not change when other jobs share the cores; the mesh runs in wall time. On a
2-core machine at load L a worker gets about 2/L of a core, and every pass takes ~L/2 times
its profiled time (the first SmolLM2 runs here: 4-6x at load 8-10). The static baseline runs
that `--bounds auto` makes anyway measure that factor: the median over them of measured time
per output token / predicted time per output token. Every time in the profile is multiplied by
it before planning (``meta.calibration`` records the factor and where it came from); the
baseline runs are then not reused as evidence for the planner's accuracy.
"""

from __future__ import annotations

import copy
import statistics
from typing import Any


def contention_factor(baseline: list[dict[str, Any]]) -> float | None:
    """Median measured / predicted time per output token over the baseline runs (None: no
    run measured one)."""
    ratios = [b["tpot_s"] / b["predicted_tpot_s"] for b in baseline
              if b.get("tpot_s") and b.get("predicted_tpot_s")]
    return statistics.median(ratios) if ratios else None


def scaled_profile(profile: Any, factor: float, source: str) -> Any:
    """A copy of ``profile`` with every time multiplied by ``factor``."""
    from coordinator.planner.profile import Profile

    if not factor > 0:
        raise ValueError(f"a calibration factor must be > 0, got {factor}")
    meta = copy.deepcopy(profile.meta)
    for row in meta.get("pass_overhead") or []:
        row["time_s"] = float(row["time_s"]) * factor
    meta["calibration"] = {"factor": factor, "source": source}
    rows = [{**r, "time_s": float(r["time_s"]) * factor} for r in profile.rows]
    return Profile(meta=meta, rows=rows)
