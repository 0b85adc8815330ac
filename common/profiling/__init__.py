"""XProfiler, measuring side: per-layer, LM-head, all-reduce and transfer costs of the real
engine on this machine, as a profile table for ``coordinator.planner.profile.Profile``.

Usage: ``measure_profile("smollm2-135m", tp_sizes=(1, 2))`` -> ``{"meta": ..., "rows": [...]}``
(``exegpt profile --model smollm2-135m --tp 1,2``). Design and grids: docs/profiling.md.
"""

from common.profiling.grid import Grid, Timing
from common.profiling.measure import measure_profile

__all__ = ["Grid", "Timing", "measure_profile"]
