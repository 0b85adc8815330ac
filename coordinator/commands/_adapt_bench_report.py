"""`exegpt bench adapt`'s numbers: phases, the switch's costs, throughput over time, a plot.

Phases (times from the shift):
    before   [start + warm-up, shift)           the old plan on the old law
    during   [shift, switch)                    adapt: until the (first) knob switch;
                                                keep: the same span as adapt's;
                                                restart: drain + stop + start (no service)
    after    [switch, end)                      the new knobs (restart: the new mesh)
Throughput = requests (and tokens) finished in the phase / its length. Bound attainment =
share of the requests that ARRIVED in the phase whose latency from encode start (the plan's
SLA-(b) clock) is within the bound; also their p99 latency. "Steady" = the first time after the
switch from which the 20 s moving average of finished requests/s stays within 20% of the mean
over the run's last third (RRA finishes requests in bursts, one per 7-15 s cycle here).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from coordinator.commands._adapt_bench import ArmRun, BenchConfig

STEADY_TOLERANCE = 0.2
SMOOTH_S = 20.0  # moving average: RRA finishes requests in bursts, one per cycle


def series(run: ArmRun, bin_s: float) -> dict[str, list[float]]:
    """Finished requests/s and tokens/s per bin, times relative to the shift."""
    edges = np.arange(run.t0, run.t_end + bin_s, bin_s)
    done = np.array([r["t_done"] for r in run.records])
    toks = np.array([r["out"] for r in run.records], dtype=float)
    seqs, _ = np.histogram(done, edges)
    tok, _ = np.histogram(done, edges, weights=toks)
    return {"t": [float(t - run.t_shift) for t in edges[:-1]],
            "seq_s": [float(x / bin_s) for x in seqs], "tok_s": [float(x / bin_s) for x in tok]}


def phase(run: ArmRun, lo: float, hi: float, bound_s: float) -> dict[str, Any]:
    """Throughput in [lo, hi) (absolute times) and the bound attainment of its arrivals."""
    span = max(hi - lo, 1e-9)
    finished = [r for r in run.records if lo <= r["t_done"] < hi]
    arrived = [r for r in run.records if lo <= r["t_arrival"] < hi]
    lat = np.array([r["t_finish"] - r["t_encode"] for r in arrived])
    return {"span_s": round(hi - lo, 2), "seq_s": round(len(finished) / span, 2),
            "tok_s": round(sum(r["out"] for r in finished) / span, 1),
            "arrived": len(arrived),
            "attainment": round(float((lat <= bound_s).mean()), 3) if lat.size else None,
            "p99_latency_s": round(float(np.percentile(lat, 99)), 2) if lat.size else None}


def steady_after(s: dict[str, list[float]], t_from: float, smooth_s: float = SMOOTH_S
                 ) -> float | None:
    """Seconds from ``t_from`` (relative to the shift, like ``s["t"]``) until throughput
    settles (module docstring); None: never, or too short a series to say."""
    t, y = np.array(s["t"]), np.array(s["seq_s"])
    bin_s = t[1] - t[0] if t.size > 1 else 1.0
    width = max(1, round(smooth_s / bin_s))
    keep = t >= t_from
    t, y = t[keep], y[keep]
    if y.size < 3 * width:
        return None
    target = y[-y.size // 3:].mean()
    avg = np.convolve(y, np.ones(width) / width, mode="valid")
    ok = np.abs(avg - target) <= STEADY_TOLERANCE * max(target, 1e-9)
    for i in range(ok.size):
        if ok[i:].all():
            return round(float(t[i] - t_from), 1)
    return None


def summarize(runs: dict[str, ArmRun], cfg: BenchConfig, plans: dict[str, Any]
              ) -> dict[str, Any]:
    """Every number of the report, JSON-ready."""
    adapt = runs.get("adapt")
    first = adapt.switches[0] if adapt and adapt.switches else None
    during_s = (first["t"] - adapt.t_shift) if first else None
    out: dict[str, Any] = {"config": _config(cfg), "plans": plans, "arms": {}}
    for name, run in runs.items():
        warm = run.t0 + min(10.0, cfg.before_s / 4)
        if name == "restart" and run.restart:
            t_switch = run.t_shift + run.restart["gap_s"]
        elif during_s is not None:
            t_switch = run.t_shift + during_s
        else:
            t_switch = run.t_shift
        last = run.switches[-1]["t"] if run.switches else t_switch
        curve = series(run, cfg.bin_s)
        arm: dict[str, Any] = {
            "before": phase(run, warm, run.t_shift, cfg.bound_s),
            "during": phase(run, run.t_shift, t_switch, cfg.bound_s),
            "after": phase(run, t_switch, run.t_end, cfg.bound_s),
            "after_last_switch": phase(run, last, run.t_end, cfg.bound_s),
            "steady_after_switch_s": steady_after(curve, t_switch - run.t_shift),
            "steady_after_last_switch_s": steady_after(curve, last - run.t_shift),
            "requests": len(run.records), "series": curve}
        if run.restart:
            arm["restart"] = {k: round(v, 2) for k, v in run.restart.items()}
        if run.switches:
            arm["switches"] = [_switch(s, run) for s in run.switches]
        out["arms"][name] = arm
    return out


def _switch(s: dict[str, Any], run: ArmRun) -> dict[str, Any]:
    fired = s["t"] - s.get("switch_s", 0.0)
    return {"at_s": round(s["t"] - run.t_shift, 2), "fired_at_s": round(fired - run.t_shift, 2),
            "detect_requests_after_shift": s["detect_arrival"] - run.sent_before_shift,
            "detect_s": s["detect_s"], "replan_s": s["replan_s"], "search_s": s["search_s"],
            "switch_s": s.get("switch_s"), "pause_s": s["pause_s"], "old": s["old"],
            "new": s["new"], "reason": s["reason"], "meets_bound": s["meets_bound"],
            "relayout": s.get("relayout")}


def _config(cfg: BenchConfig) -> dict[str, Any]:
    c = cfg.costs
    return {"decode_ms_per_stage": c.decode_ms, "encode_ms_per_stage": c.encode_ms,
            "encode_ms_per_token_per_stage": c.encode_ms_per_token, "old": cfg.old,
            "new": cfg.new, "bound_s": cfg.bound_s, "before_s": cfg.before_s,
            "after_s": cfg.after_s, "concurrency": cfg.concurrency,
            "adapt_options": cfg.adapt_options or "defaults", "seed": cfg.seed,
            "served_layers": cfg.served_layers or "the planner's"}


def _relayout(r: dict[str, Any] | None) -> str:
    if not r:
        return ""
    return (f", RE-LAYOUT to stages {r['stages']} ({r['streams']} streams): drain "
            f"{r['drain_s']:g} s, {r['migrated_requests']} requests migrated "
            f"({r['rerun_tokens']} tokens re-run), reload {r['reload_s']:g} s, pause "
            f"{r['pause_s']:g} s")


def markdown(summary: dict[str, Any]) -> str:
    """The tables docs/adaptation.md shows."""
    lines = []
    for name, plan in summary["plans"].items():
        knobs = (f"B {plan['B_E']}, N_D {plan['N_D']}, " if "B_E" in plan else "")
        lines.append(f"- plan {name}: {knobs}predicted {plan['throughput_seq_s']} seq/s, "
                     f"p99-length latency {plan['latency_p99len_s']} s")
    lines += ["", "| arm | phase | span s | seq/s | tok/s | arrived | within bound | "
              "p99 latency s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, arm in summary["arms"].items():
        for ph in ("before", "during", "after"):
            p = arm[ph]
            att = "-" if p["attainment"] is None else f"{p['attainment']:.0%}"
            lat = "-" if p["p99_latency_s"] is None else f"{p['p99_latency_s']:.2f}"
            lines.append(f"| {name} | {ph} | {p['span_s']:.1f} | {p['seq_s']:.2f} | "
                         f"{p['tok_s']:.0f} | {p['arrived']} | {att} | {lat} |")
    lines += ["", "| arm | switch / restart | steady after (s): first / last switch |",
              "|---|---|---|"]
    for name, arm in summary["arms"].items():
        what = "; ".join(
            f"fired {s['fired_at_s']:.1f} s after the shift ({s['detect_requests_after_shift']} "
            f"requests), re-plan {s['replan_s']:.2f} s, live {s['at_s']:.1f} s, pause "
            f"{s['pause_s']:g} s, B {s['old']['B_E']}->{s['new']['B_E']}, N_D "
            f"{s['old']['N_D']}->{s['new']['N_D']}{_relayout(s.get('relayout'))}"
            for s in arm.get("switches", []))
        if "restart" in arm:
            r = arm["restart"]
            what = (f"drain {r['drain_s']:.1f} s + stop/start {r['stop_start_s']:.1f} s = gap "
                    f"{r['gap_s']:.1f} s")
        lines.append(f"| {name} | {what or 'none'} | {arm['steady_after_switch_s']} / "
                     f"{arm['steady_after_last_switch_s']} |")
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: str) -> None:
    """Finished requests/s over time, one line per arm; the shift and the switches marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for name, arm in summary["arms"].items():
        s = arm["series"]
        bin_s = s["t"][1] - s["t"][0] if len(s["t"]) > 1 else 1.0
        width = max(1, min(round(SMOOTH_S / bin_s), len(s["t"])))  # a short run: less
        t = np.array(s["t"])[width - 1:] + bin_s  # the average of the bins ending here
        for ax, key in zip(axes, ("seq_s", "tok_s"), strict=True):
            ax.plot(t, np.convolve(s[key], np.ones(width) / width, mode="valid"), label=name)
        for sw in arm.get("switches", []):
            axes[0].axvline(sw["at_s"], color="C0", ls=":", lw=1)
    for ax, what in zip(axes, ("requests/s", "tokens/s"), strict=True):
        ax.axvline(0, color="k", lw=1)
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[0].set_title(f"old law -> new law at t=0 (null-model RRA mesh), {SMOOTH_S:g} s moving "
                      "average; dotted: switches (knobs or re-layout)", fontsize=10)
    axes[1].set_xlabel("seconds from the shift")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
