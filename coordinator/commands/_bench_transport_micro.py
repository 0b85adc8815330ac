"""In-process cost of one KV handoff message, for `exegpt bench transport`.

Why: the two-process bandwidth depends on the whole machine's load, while the CPU the
protocol adds per message (build, encode, strict decode, the copy into the destination) can
be measured in one process with little noise. Each step is timed alone over many messages,
in thread CPU time (so other processes' load counts less); medians over repeats, in
microseconds per message. "raw copy" is the raw+copy receiver's copy of the same bytes as one
frame, for reference.

Two regimes: "hot" repeats each step back to back (caches warm: the code's own cost), "cold"
first evicts the caches (an 8 MiB copy, not timed) before every call, as happens in a real
receiver where the kernel and the previous copy have just streamed megabytes through them.
Cold costs are several times the hot ones and are what the two-process run pays.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

STEPS = ("build", "encode", "decode", "copy", "raw copy")


def _kv_message(tensors: dict[str, Any], seq_len: int, i: int) -> Any:
    """The message the bench's sender builds per send (seq_len known, as an encoder's)."""
    from common import protocol as P

    kv = P.KVPayload(f"r{i}", seq_len, 0, 4, 0, 2, 2, tensors)
    return P.KVHandoff(f"r{i}", "bench", 1, kv.seq_len, 16, P.Sampling(), kv)


def _received(frames: list[Any]) -> list[Any]:
    """Frames as a receiver holds them: zmq.Frame objects over their own copies."""
    import zmq

    return [zmq.Frame(bytes(memoryview(f).cast("B"))) for f in frames]


def _per_call_us(fn: Callable[[], Any], count: int, repeats: int,
                 evict: Callable[[], Any] | None) -> float:
    runs = []
    for _ in range(repeats):
        total = 0.0
        if evict is None:
            t0 = time.thread_time()
            for _ in range(count):
                fn()
            total = time.thread_time() - t0
        else:
            for _ in range(count):
                evict()
                t0 = time.thread_time()
                fn()
                total += time.thread_time() - t0
        runs.append(total / count * 1e6)
    return statistics.median(runs)


def micro_costs(tensors: dict[str, Any], repeats: int = 7, count: int = 100,
                cold: bool = False) -> dict[str, float]:
    """µs per message for each step of STEPS (median of `repeats`)."""
    import numpy as np
    import torch

    from common import protocol as P
    from common.tensormem import copy_bytes_into

    seq_len = int(tensors["k"].shape[2])
    msg = _kv_message(tensors, seq_len, 0)
    frames = _received(P.encode(msg))
    decoded = P.decode(frames)
    dst = {n: torch.empty(t.shape, dtype=t.dtype) for n, t in tensors.items()}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    raw_src, raw_dst = _received([bytes(nbytes)])[0], torch.empty(nbytes, dtype=torch.uint8)

    def copy() -> None:
        for name, wt in decoded.kv.tensors.items():
            wt.copy_into(dst[name])

    steps: dict[str, Callable[[], Any]] = {
        "build": lambda: _kv_message(tensors, seq_len, 1),
        "encode": lambda: P.encode(msg),
        "decode": lambda: P.decode(frames),
        "copy": copy,
        "raw copy": lambda: copy_bytes_into(raw_dst, raw_src.buffer),
    }
    evict = None
    if cold:
        a, b = np.ones(8 << 20, np.uint8), np.empty(8 << 20, np.uint8)
        evict = functools.partial(np.copyto, b, a)
    return {name: _per_call_us(fn, count, repeats, evict) for name, fn in steps.items()}


def run_micro(sizes: list[int], repeats: int) -> list[dict[str, Any]]:
    """Hot and cold costs per payload size, printed as a table; rows for the JSON report."""
    from coordinator.commands.bench_transport import _kv_tensors

    rows = []
    for size in sizes:
        tensors = _kv_tensors(size)
        count = max(5, min(64, (64 << 20) // size))
        for cold in (False, True):
            costs = micro_costs(tensors, repeats, count, cold)
            rows.append({"size_mib": size / (1 << 20), "regime": "cold" if cold else "hot",
                         **{f"{k.replace(' ', '_')}_us": v for k, v in costs.items()}})
    print("\nIn-process CPU per KV handoff message (µs, thread time, median of "
          f"{repeats}; cold = caches evicted before each call):")
    print(f"{'size':>7} {'regime':<6} " + " ".join(f"{s:>9}" for s in STEPS))
    for r in rows:
        print(f"{r['size_mib']:>5g}Mi {r['regime']:<6} "
              + " ".join(f"{r[s.replace(' ', '_') + '_us']:>9.1f}" for s in STEPS))
    return rows
