"""PNG figures: throughput vs latency bound per policy, and a schedule's per-worker timeline.

matplotlib is imported inside the functions (Agg backend) so the planner stays light to import.
"""

from __future__ import annotations

import math
from pathlib import Path

from coordinator.planner.des import DESResult
from coordinator.planner.sweep import SweepPoint

KIND_COLOURS = {"encode": "tab:orange", "decode": "tab:blue", "batch": "tab:purple",
                "iteration": "tab:green"}


def _pyplot():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(points: list[SweepPoint], path: str | Path, title: str = "") -> Path:
    """Throughput (seq/s) at each bound, one line per policy; 'inf' drawn at the right edge."""
    plt = _pyplot()
    finite = sorted({p.bound for p in points if math.isfinite(p.bound)})
    right = (finite[-1] * 1.5) if finite else 1.0
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for policy in dict.fromkeys(p.policy for p in points):
        xs, ys = [], []
        for p in points:
            if p.policy == policy and p.best is not None:
                xs.append(p.bound if math.isfinite(p.bound) else right)
                ys.append(p.best[1].throughput_seq_s)
        ax.plot(xs, ys, marker="o", label=policy)
    ticks = finite + [right]
    ax.set_xticks(ticks, [f"{b:.1f}" for b in finite] + ["inf"])
    ax.set_xlabel("latency bound (s)")
    ax.set_ylabel("throughput (sequences/s)")
    ax.set_title(title or "throughput under a latency bound")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_timeline(result: DESResult, path: str | Path, span_s: float | None = None,
                  title: str = "") -> Path:
    """Busy intervals per worker over a stretch of the steady state (default: ~3 cycles)."""
    plt = _pyplot()
    lo, hi = result.window
    end = lo + (span_s if span_s is not None else min(hi - lo, _default_span(result)))
    fig, ax = plt.subplots(figsize=(10, 0.5 + 0.45 * len(result.busy)))
    for worker, intervals in enumerate(result.busy):
        for start, stop, kind in intervals:
            if stop < lo or start > end:
                continue
            ax.broken_barh([(start - lo, stop - start)], (worker - 0.4, 0.8),
                           facecolor=KIND_COLOURS.get(kind, "grey"), edgecolor="white",
                           linewidth=0.4)
    ax.set_yticks(range(len(result.busy)), [f"worker {i}" for i in range(len(result.busy))])
    ax.invert_yaxis()
    ax.set_xlim(0, end - lo)
    ax.set_xlabel("time in steady state (s)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in KIND_COLOURS.values()]
    ax.legend(handles, list(KIND_COLOURS), loc="upper right", fontsize="small")
    ax.set_title(title or "schedule timeline")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _default_span(result: DESResult) -> float:
    m = result.metrics
    return max(3 * m.latency_p99len_s / 4, 10 * m.tpot_s, 1e-6)
