"""Wall and CPU seconds a worker's compute took, for `exegpt stats` and the bench.

The planner's measured profile is CPU time of one thread (`meta.compute_clock`), so the ratio
``busy_s / busy_cpu_s`` says how much longer the compute took on the wall than on the CPU:
1.0 when the worker had a core to itself, 1.25 when other processes took a fifth of it (a
shared machine, or more compute processes than cores). The bench reports it per run, so a
prediction error can be told apart from the machine's load moving between the calibration
runs and the run. The CPU clock is the calling thread's (the compute thread: one torch
thread per worker on CPU); on CUDA it measures the host side only.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class BusyClock:
    """Seconds of wall and thread-CPU time spent inside ``timing()`` blocks."""

    def __init__(self) -> None:
        self.wall_s = 0.0
        self.cpu_s = 0.0

    @contextmanager
    def timing(self) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.wall_s += time.perf_counter() - wall
            self.cpu_s += time.thread_time() - cpu

    def load(self) -> dict[str, Any]:
        """The worker's ``load`` fields (heartbeats, `exegpt stats`)."""
        return {"busy_s": round(self.wall_s, 6), "busy_cpu_s": round(self.cpu_s, 6)}
