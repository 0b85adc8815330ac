"""What `exegpt stats` computes from one Stats message, and how it prints it against the plan.

Sources, in the order they are trusted:
- the request lifecycles the coordinator returns for ``StatsRequest(include_requests=True)``
  (``Stats.requests``): latency, TTFT, time per token, throughput and the encode batches are
  computed here from those timestamps, the one source the whole project uses for latency;
  requests of one encode batch share ``t_encode_start``, so batch sizes (and B_E adjustments
  as changes of the size) fall out of the same data;
- the stats tree (``Stats.stats``): counters, the worker list with each worker's latest
  heartbeat ``load``, and, when the coordinator reports them, ``plan``, ``adjustments``
  (B_E changes) and per-worker ``kv_bytes_sent`` / ``kv_bytes_received`` / ``batch_size``.
A number no source provides prints as ``n/a``; nothing is estimated.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

PERCENTILES = (50, 90, 99)


def fetch_stats(endpoint: str, timeout_s: float = 10.0) -> Any:
    """One Stats message (with request lifecycles) through the SDK."""
    from common.client import Client

    with Client(endpoint, default_timeout_s=timeout_s) as client:
        return client.stats(include_requests=True, timeout_s=timeout_s)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (no interpolation: every reported value was observed)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _pcts(values: Sequence[float]) -> dict[str, float | None]:
    return {f"p{q}": percentile(values, q) for q in PERCENTILES} | {
        "mean": sum(values) / len(values) if values else None, "count": len(values)}


def request_metrics(lifecycles: Iterable[Any], p99_output: int | None) -> dict[str, Any]:
    """Latency/TTFT/TPOT percentiles and throughput over the finished requests."""
    done = [life for life in lifecycles
            if life.t_finish is not None and life.t_arrival is not None]
    latency = [lf.t_finish - lf.t_arrival for lf in done]
    ttft = [lf.t_first_token - lf.t_arrival for lf in done if lf.t_first_token is not None]
    tpot = [(lf.t_finish - lf.t_first_token) / (len(lf.t_tokens) - 1) for lf in done
            if lf.t_first_token is not None and len(lf.t_tokens) > 1]
    kv = [lf.t_kv_received - lf.t_kv_sent for lf in done
          if lf.t_kv_received is not None and lf.t_kv_sent is not None]
    out: dict[str, Any] = {"finished": len(done), "latency_s": _pcts(latency),
                           "ttft_s": _pcts(ttft), "tpot_s": _pcts(tpot),
                           "kv_transfer_s": _pcts(kv)}
    if done:
        window = max(lf.t_finish for lf in done) - min(lf.t_arrival for lf in done)
        tokens = sum(len(lf.t_tokens) for lf in done)
        out["window_s"] = window
        out["throughput_seq_s"] = len(done) / window if window > 0 else None
        out["throughput_tok_s"] = tokens / window if window > 0 else None
    if p99_output:
        long = [lf.t_finish - lf.t_arrival for lf in done if len(lf.t_tokens) >= p99_output]
        out["latency_p99len_s"] = max(long) if long else None
    return out


def encode_batches(lifecycles: Iterable[Any]) -> list[dict[str, float]]:
    """Encode batches in time order: requests of one batch share their encode-start stamp."""
    groups: dict[float, int] = defaultdict(int)
    for life in lifecycles:
        if life.t_encode_start is not None:
            groups[life.t_encode_start] += 1
    return [{"t": t, "size": n} for t, n in sorted(groups.items())]


def decode_batch_over_time(lifecycles: Sequence[Any], buckets: int = 10) -> list[dict[str, float]]:
    """Mean number of sequences decoding (between first token and finish) per time bucket."""
    spans = [(lf.t_first_token, lf.t_finish) for lf in lifecycles
             if lf.t_first_token is not None and lf.t_finish is not None]
    if not spans:
        return []
    start, end = min(s for s, _ in spans), max(e for _, e in spans)
    width = (end - start) / buckets if end > start else 1.0
    out = []
    for i in range(buckets):
        lo, hi = start + i * width, start + (i + 1) * width
        busy = sum(max(0.0, min(e, hi) - max(s, lo)) for s, e in spans)
        out.append({"t": lo, "mean_batch": busy / width})
    return out


def summarize(msg: Any, plan: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole report as one JSON-able value (what ``--json`` prints)."""
    tree = dict(msg.stats or {})
    plan = plan or tree.get("plan")
    p99_output = (plan or {}).get("workload_info", {}).get("p99_output")
    lifecycles = list((msg.requests or {}).values())
    batches = encode_batches(lifecycles)
    return {
        "model": tree.get("model"), "counters": tree.get("requests", {}),
        "overall": request_metrics(lifecycles, p99_output),
        "workers": [_worker_row(w) for w in tree.get("workers", [])],
        "encode_batches": batches, "B_E_changes": _changes(batches, tree.get("adjustments")),
        "B_E_adjustments": (tree.get("requests") or {}).get("be_adjustments"),
        "decode_batch": decode_batch_over_time(lifecycles),
        "plan": None if plan is None else {
            "policy": plan.get("policy"), "B_E": plan.get("B_E"), "B_D": plan.get("B_D"),
            "latency_bound_s": plan.get("latency_bound_s"), "predicted": plan.get("predicted")},
        "lifecycles_reported": bool(lifecycles),
    }


def interval_rates(before: dict[str, Any], after: dict[str, Any], seconds: float,
                   ) -> dict[str, float] | None:
    """Requests and tokens per second between two counter snapshots (``--watch``): measured
    throughput even when the coordinator reports no lifecycles."""
    if seconds <= 0 or not before or not after:
        return None
    done = after.get("completed", 0) - before.get("completed", 0)
    tokens = after.get("tokens_out", 0) - before.get("tokens_out", 0)
    return {"seq_s": done / seconds, "tok_s": tokens / seconds, "interval_s": seconds}


def _changes(batches: list[dict[str, float]], reported: Any) -> list[dict[str, Any]]:
    """B_E adjustments: the coordinator's own log when it sends one, else size changes."""
    if isinstance(reported, list):
        return reported
    out, last = [], None
    for b in batches:
        if last is not None and b["size"] != last:
            out.append({"t": b["t"], "from": last, "to": b["size"]})
        last = b["size"]
    return out


def _worker_row(w: dict[str, Any]) -> dict[str, Any]:
    load = w.get("load") or {}
    keys = ("batches_done", "requests_done", "steps", "tokens_out", "kv_bytes_sent",
            "kv_bytes_received", "batch_size")
    return {"worker_id": w.get("worker_id"), "role": w.get("role"), "state": w.get("state"),
            "tp": f"{w.get('tp_rank', 0)}/{w.get('tp_size', 1)}", "active": w.get("active"),
            **{k: load.get(k) for k in keys}}


def _fmt(value: Any, scale: float = 1.0, unit: str = "", digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value * scale:.{digits}g}{unit}"
    return f"{value}{unit}"


def render_stats(msg: Any, plan: dict[str, Any] | None = None) -> str:
    return render_summary(summarize(msg, plan))


def render_summary(s: dict[str, Any]) -> str:
    o, pr = s["overall"], ((s.get("plan") or {}).get("predicted") or {})
    lines = [f"model {s['model']}   requests {s['counters']}"]
    if not s["lifecycles_reported"]:
        lines.append("(the coordinator returned no request lifecycles: latency, TTFT, TPOT "
                     "and batch history are n/a)")
    lines.append(f"{'':22}{'measured':>26}   {'plan predicted':>16}")
    rate = s.get("interval") or {}
    rows = [("throughput seq/s", _fmt(o.get("throughput_seq_s", rate.get("seq_s"))),
             _fmt(pr.get("throughput_seq_s"))),
            ("throughput tok/s", _fmt(o.get("throughput_tok_s", rate.get("tok_s"))),
             _fmt(pr.get("throughput_tok_s"))),
            ("latency p50/p90/p99 s", _trio(o["latency_s"]), _fmt(pr.get("latency_p99_s"))),
            ("p99-length latency s", _fmt(o.get("latency_p99len_s")),
             _fmt(pr.get("latency_p99len_s"))),
            ("TTFT p50/p90/p99 s", _trio(o["ttft_s"]), _fmt(pr.get("ttft_s"))),
            ("time/token p50/p99 ms", _trio(o["tpot_s"], 1e3, ("p50", "p99")),
             _fmt(pr.get("tpot_s"), 1e3)),
            ("KV transfer p50/p99 ms", _trio(o["kv_transfer_s"], 1e3, ("p50", "p99")), "")]
    lines += [f"{name:22}{meas:>26}   {pred:>16}" for name, meas, pred in rows]
    lines += _batch_lines(s)
    lines.append(f"{'worker':12}{'role':9}{'state':7}{'tp':5}{'active':>7}{'batches':>8}"
                 f"{'steps':>8}{'tokens':>8}{'KV sent':>11}{'KV recv':>11}")
    for w in s["workers"]:
        lines.append(f"{str(w['worker_id']):12}{str(w['role']):9}{str(w['state']):7}"
                     f"{w['tp']:5}{_fmt(w['active']):>7}{_fmt(w['batches_done']):>8}"
                     f"{_fmt(w['steps']):>8}{_fmt(w['tokens_out']):>8}"
                     f"{_bytes(w['kv_bytes_sent']):>11}{_bytes(w['kv_bytes_received']):>11}")
    return "\n".join(lines)


def _trio(p: dict[str, Any], scale: float = 1.0, keys: Sequence[str] = ("p50", "p90", "p99"),
          ) -> str:
    return "/".join(_fmt(p.get(k), scale) for k in keys)


def _bytes(n: Any) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _batch_lines(s: dict[str, Any]) -> list[str]:
    plan = s.get("plan") or {}
    sizes = [b["size"] for b in s["encode_batches"]]
    dec = [round(b["mean_batch"], 1) for b in s["decode_batch"]]
    lines = [f"encode batches        {len(sizes)}, sizes over time "
             f"{_series(sizes)} (plan B_E {_fmt(plan.get('B_E'))})",
             f"decode batch          mean over time {_series(dec)} "
             f"(plan B_D {_fmt(plan.get('B_D'))})"]
    changes = s["B_E_changes"]
    shown = ", ".join(f"{c.get('from')}->{c.get('to')}" for c in changes[-8:])
    counted = s.get("B_E_adjustments")
    total = f"{counted} batches sized off B_E (coordinator)" if counted is not None else \
        f"{len(changes)} size changes"
    lines.append(f"B_E adjustments       {total}{'; recent: ' + shown if shown else ''}")
    return lines


def _series(values: Sequence[Any], limit: int = 16) -> str:
    if not values:
        return "n/a"
    head = list(values[-limit:])
    return ("... " if len(values) > limit else "") + " ".join(str(v) for v in head)
