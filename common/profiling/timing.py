"""Timing the real engine from the inside: forward hooks on its modules, timed collectives.

Why hooks: the planner needs ONE layer split into attention and the rest, but the engine's
layer is one module whose attention core sits between two of its linears. Rather than
reimplement the layer, we run the real stage pass and read the clock at module boundaries:

    pass:  [embed] .. layer( norm, qkv | rope, KV write, attention | o, all-reduce, mlp ) ..
           [final norm, lm_head]   everything else in the pass is per-pass overhead
    attention core = from the end of each attention's input projection (``qkv``, T5 cross
    ``q``) to the start of its output projection ``o``; rest = layer - core - all-reduces.

``TimedTP`` is the engine's TPGroup with each all-reduce's wall time logged, so the layer rows
exclude the all-reduces the planner adds from the ``allreduce`` table (2 or 3 per layer).
The CPU runs synchronously, so the clock at a hook is the time the kernel finished.

Which clock: compute is timed in this thread's CPU time when a rank runs one torch thread
(``use_clock("cpu")``: equal to wall time on a dedicated core, and blind to other processes
that share the machine and preempt long passes), otherwise in wall time (intra-op worker
threads are invisible to a thread clock). Collectives and transfers are always wall time:
their cost is waiting for another process.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from common.engine.tp import TPGroup
from common.profiling.grid import Timing

_clock = time.perf_counter


def use_clock(name: str) -> None:
    """``"cpu"`` (thread CPU time) or ``"wall"`` for the compute hooks of this process."""
    global _clock
    if name not in ("cpu", "wall"):
        raise ValueError(f"clock must be 'cpu' or 'wall', got {name!r}")
    _clock = time.thread_time if name == "cpu" else time.perf_counter


def now() -> float:
    return _clock()


@dataclass(frozen=True)
class TimedTP(TPGroup):
    """TPGroup whose all-reduces log (start, end); ``log`` is cleared before every pass."""

    log: list[tuple[float, float]] = field(default_factory=list, compare=False, repr=False)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return x
        start = now()
        out = super().all_reduce(x)
        self.log.append((start, now()))
        return out

    def reduced_within(self, start: float, end: float) -> float:
        """Seconds of all-reduce inside [start, end]."""
        return sum(max(0.0, min(b, end) - max(a, start)) for a, b in self.log)


class Probe:
    """Clock readings at the entry ("pre") and exit ("post") of watched modules, per pass."""

    def __init__(self) -> None:
        self.marks: dict[tuple[str, str], float] = {}
        self._handles: list[Any] = []

    def watch(self, name: str, module: nn.Module) -> None:
        def pre(_m: nn.Module, _args: Any) -> None:
            self.marks[(name, "pre")] = now()

        def post(_m: nn.Module, _args: Any, _out: Any) -> None:
            self.marks[(name, "post")] = now()

        self._handles += [module.register_forward_pre_hook(pre),
                          module.register_forward_hook(post)]

    def span(self, first: tuple[str, str], last: tuple[str, str]) -> float:
        try:
            return self.marks[last] - self.marks[first]
        except KeyError as exc:
            raise RuntimeError(f"profiling hook {exc} did not fire: the engine's module layout "
                               "changed; update common/profiling/stages.py") from None

    def clear(self) -> None:
        self.marks.clear()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@dataclass
class Group:
    """This rank's view of the measuring group (``group`` None for one process)."""

    tp_size: int = 1
    group: Any = None

    def barrier(self) -> None:
        if self.tp_size > 1:
            dist.barrier(group=self.group)

    def agree_max(self, value: int) -> int:
        """Every rank must run the same number of passes (the passes hold collectives)."""
        if self.tp_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t.item())


def run_cell(step: Callable[[], dict[str, float]], timing: Timing, group: Group,
             reset: Callable[[], None] | None = None) -> dict[str, float]:
    """Warm up, then time ``step`` (which returns named seconds) and keep each name's median.

    ``reset`` runs untimed before every pass (e.g. rewinding KV lengths). GC is paused while
    timing so a collection does not land inside one pass."""
    first = 0.0
    for i in range(timing.warmup):
        if reset:
            reset()
        group.barrier()
        t0 = time.perf_counter()
        step()
        first = time.perf_counter() - t0
        # a pass longer than the whole target is not dominated by first-call costs: one
        # warm-up is enough (every rank must take the same decision)
        if i + 1 < timing.warmup and group.agree_max(int(first < timing.target_s)) == 0:
            break
    repeats = group.agree_max(timing.repeats_for(first))
    samples: dict[str, list[float]] = {}
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            if reset:
                reset()
            group.barrier()
            for name, value in step().items():
                samples.setdefault(name, []).append(value)
    finally:
        gc.enable()
    return {name: statistics.median(values) for name, values in samples.items()}


class ProgressFile:
    """Rank 0 reports finished work units to the parent through a small JSON file."""

    def __init__(self, path: str | None, enabled: bool) -> None:
        self.path = Path(path) if path and enabled else None
        self.done = 0

    def advance(self, units: int = 1, label: str = "") -> None:
        self.done += units
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"done": self.done, "label": label}))
        os.replace(tmp, self.path)


def read_progress(path: Path) -> tuple[int, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return 0, ""
    return int(data.get("done", 0)), str(data.get("label", ""))
