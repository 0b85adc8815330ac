"""PNG plots of an evaluation (matplotlib, Agg): throughput vs bound per policy, predicted vs
measured, and the timeline of one run.

The timeline is rebuilt from request lifecycles alone (the one source of timing truth): encode
passes are the distinct (encode start, encode end) spans, decode iterations are the distinct
times tokens after the first reached the coordinator; below them, one row per request (queued,
encode, decode).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from coordinator.bench.measure import RequestRecord

MARKERS = {"exegpt": "o", "static": "s", "continuous": "^", "rra": "D", "waa": "v"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bound_order(rows: list[dict[str, Any]]) -> list[float | None]:
    return sorted({r["bound_s"] for r in rows}, key=lambda b: math.inf if b is None else b)


def plot_throughput(rows: list[dict[str, Any]], path: Path) -> Path:
    """Measured seq/s per policy at each bound (hollow: bound missed), predicted dashed."""
    plt = _pyplot()
    bounds = _bound_order(rows)
    labels = ["none" if b is None else f"{b:.3g}" for b in bounds]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for policy in dict.fromkeys(r["policy"] for r in rows):
        mine = {r["bound_s"]: r for r in rows if r["policy"] == policy}
        xs, meas, pred, met = [], [], [], []
        for i, b in enumerate(bounds):
            r = mine.get(b) or {}
            m, p = r.get("measured") or {}, r.get("predicted") or {}
            xs.append(i)
            meas.append(m.get("throughput_seq_s") or math.nan)
            pred.append(p.get("throughput_seq_s") or math.nan)
            met.append(bool(m.get("bound_met")))
        line, = ax.plot(xs, meas, marker=MARKERS.get(policy, "o"), label=f"{policy} measured")
        ax.plot(xs, pred, linestyle="--", color=line.get_color(), alpha=0.6,
                label=f"{policy} predicted")
        missed = [(x, y) for x, y, ok in zip(xs, meas, met, strict=True) if not ok]
        if missed:
            ax.scatter(*zip(*missed, strict=True), s=120, facecolors="none",
                       edgecolors="red", zorder=3)
    ax.set_xticks(range(len(bounds)), labels)
    ax.set_xlabel("latency bound (s), SLA-(b); red ring: bound missed")
    ax.set_ylabel("throughput (sequences/s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_accuracy(rows: list[dict[str, Any]], path: Path) -> Path:
    """Predicted vs measured throughput and p99-length latency, one point per run."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, key, unit in ((axes[0], "throughput_seq_s", "seq/s"),
                          (axes[1], "latency_p99len_s", "s")):
        pts = [((r.get("predicted") or {}).get(key), (r.get("measured") or {}).get(key),
                r["policy"]) for r in rows if r.get("measured") and r.get("fills")]
        pts = [(p, m, pol) for p, m, pol in pts if p is not None and m is not None
               and math.isfinite(p)]
        for pol in dict.fromkeys(p[2] for p in pts):
            mine = [(p, m) for p, m, q in pts if q == pol]
            ax.scatter(*zip(*mine, strict=True), marker=MARKERS.get(pol, "o"), label=pol)
        if pts:
            hi = max(max(p, m) for p, m, _ in pts) * 1.1
            ax.plot([0, hi], [0, hi], color="grey", linewidth=0.8)
            ax.set_xlim(0, hi)
            ax.set_ylim(0, hi)
        ax.set_xlabel(f"predicted ({unit})")
        ax.set_ylabel(f"measured ({unit})")
        ax.set_title(f"{key} (plans the K requests fill)", fontsize=9)
        ax.grid(alpha=0.3)
        if pts:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no run the K requests fill", ha="center",
                    transform=ax.transAxes)
    return _save(fig, path)


def activity(records: list[RequestRecord]) -> tuple[list[tuple[float, float]], list[float]]:
    """(distinct encode spans, distinct decode iteration times) from lifecycles."""
    spans = sorted({(r.t_encode_start, r.t_encode_end) for r in records
                    if r.t_encode_start is not None and r.t_encode_end is not None})
    ticks = sorted({round(t, 4) for r in records for t in r.t_tokens[1:]})
    return spans, ticks  # type: ignore[return-value]


def plot_timeline(records: list[RequestRecord], path: Path, title: str = "") -> Path:
    plt = _pyplot()
    ok = [r for r in records if r.ok]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True,
                                      gridspec_kw={"height_ratios": [1, 3]})
    if not ok:
        top.set_title(f"{title}: no request finished")
        return _save(fig, path)
    t0 = min(r.t_arrival or r.t_encode_start for r in ok)  # type: ignore[type-var]
    spans, ticks = activity(ok)
    top.broken_barh([(a - t0, b - a) for a, b in spans], (1.1, 0.8), color="tab:blue")
    top.vlines([t - t0 for t in ticks], 0.1, 0.9, color="tab:orange", linewidth=0.5)
    top.set_yticks([0.5, 1.5], ["decode iterations", "encode passes"])
    top.set_title(title)
    for i, r in enumerate(sorted(ok, key=lambda r: r.t_encode_start)):  # type: ignore
        arrival = (r.t_arrival or r.t_encode_start) - t0  # type: ignore[operator]
        start, end = r.t_encode_start - t0, (r.t_encode_end or r.t_encode_start) - t0  # type: ignore
        first = (r.t_first_token or end + t0) - t0
        bars = [(arrival, start - arrival, "lightgrey"), (start, end - start, "tab:blue"),
                (first, r.t_finish - t0 - first, "tab:orange")]  # type: ignore[operator]
        for x, w, c in bars:
            bottom.broken_barh([(x, max(w, 0.0))], (i - 0.4, 0.8), color=c)
    bottom.set_xlabel("seconds since the first arrival (grey: queued, blue: encode, "
                      "orange: decode)")
    bottom.set_ylabel("request (by encode start)")
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def write_all(results: dict[str, Any], out: Path) -> list[Path]:
    """Every plot of ``results`` into ``out``; the timeline of exegpt's run at the loosest
    finite bound (the no-bound plan's batches are larger than any K-request run)."""
    import json

    rows = results["rows"]
    paths = [plot_throughput(rows, out / "throughput_vs_bound.png"),
             plot_accuracy(rows, out / "predicted_vs_measured.png")]
    runs = [r for r in rows if r.get("records")]
    mine = [r for r in runs if r["policy"] == "exegpt"]
    finite = [r for r in mine if r["bound_s"] is not None]
    pick = (finite or mine or runs or [None])[-1]
    if pick is not None:
        data = json.loads((out / pick["records"]).read_text())
        records = [RequestRecord.from_dict(d) for d in data["repeats"][0]]
        title = f"{pick['policy']} ({(pick.get('plan') or {}).get('knobs', '')})"
        paths.append(plot_timeline(records, out / "timeline.png", title))
    return paths
