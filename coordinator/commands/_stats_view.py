"""What `exegpt stats` prints: the coordinator's measurements (coordinator/metrics.py) as rich
tables -- overall, per worker, measured beside the plan's predictions, and on request the recent
requests' lifecycles.

Every number comes from the coordinator's Stats answer; this module only formats (and, for a
``--plan`` given here, puts that plan's predictions beside the measured numbers with the same
rule the coordinator uses). A number nobody measured prints as ``n/a``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from rich.console import Console, Group
from rich.table import Table

from coordinator.metrics_report import decode_batch_mean, json_safe, vs_plan

RECENT_REQUESTS_SHOWN = 20


def fetch_stats(endpoint: str, timeout_s: float = 10.0, include_requests: bool = False) -> Any:
    """One Stats message through the SDK."""
    from common.client import Client

    with Client(endpoint, default_timeout_s=timeout_s) as client:
        return client.stats(include_requests=include_requests, timeout_s=timeout_s)


def summarize(msg: Any, plan: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report as one JSON-able value (what ``--json`` prints): the coordinator's stats
    tree, its lifecycles under ``lifecycles`` when asked for, and ``plan``/``vs_plan`` from
    ``plan`` when one is given here (it wins over the coordinator's)."""
    tree = dict(msg.stats or {})
    if msg.requests:
        tree["lifecycles"] = {req_id: _life_dict(life) for req_id, life in msg.requests.items()}
    if plan is not None and isinstance(tree.get("overall"), dict):
        overall = tree["overall"]
        tree["plan"] = json_safe({k: plan.get(k) for k in (
            "policy", "B_E", "B_D", "N_D", "B_m", "latency_bound_s", "sla", "workload",
            "num_workers", "predicted", "workload_info")})
        tree["vs_plan"] = vs_plan(plan, overall, (overall.get("encode_batches") or {}).get(
            "mean"), decode_batch_mean(overall.get("decode_batch") or {}))
    return tree


def _life_dict(life: Any) -> dict[str, Any]:
    import dataclasses

    out = dataclasses.asdict(life)
    out["t_tokens"] = list(out["t_tokens"])
    return out


def interval_rates(before: dict[str, Any], after: dict[str, Any], seconds: float,
                   ) -> dict[str, float] | None:
    """Requests and tokens per second between two counter snapshots (``--watch``)."""
    if seconds <= 0 or not before or not after:
        return None
    done = after.get("completed", 0) - before.get("completed", 0)
    tokens = after.get("tokens_out", 0) - before.get("tokens_out", 0)
    return {"seq_s": done / seconds, "tok_s": tokens / seconds, "interval_s": seconds}


# ---- formatting ---------------------------------------------------------------------------
def fmt(value: Any, scale: float = 1.0, unit: str = "", digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value * scale:.{digits}g}{unit}"
    if isinstance(value, int):
        return f"{value * scale:.{digits}g}{unit}" if scale != 1.0 else f"{value}{unit}"
    return f"{value}{unit}"


def fmt_bytes(n: Any) -> str:
    if not isinstance(n, int | float):
        return "n/a"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _get(tree: Any, *path: str) -> Any:
    for key in path:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def render(s: dict[str, Any], watch: dict[str, float] | None = None) -> Group:
    """Every table of the report (a rich renderable)."""
    parts: list[Any] = [overall_table(s, watch), latency_table(s), worker_table(s)]
    if any((w.get("load") or {}).get("busy_s") is not None for w in s.get("workers") or []):
        parts.append(compute_table(s))
    if s.get("vs_plan"):
        parts.append(plan_table(s))
    if s.get("lifecycles"):
        parts.append(request_table(s))
    if "overall" not in s:
        parts = [f"this coordinator reports no measurements (counters only): {s.get('requests')}"]
    return Group(*parts)


def render_text(s: dict[str, Any], width: int = 140) -> str:
    """The tables as plain text (tests, logs)."""
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(render(s))
    return console.file.getvalue()  # type: ignore[attr-defined]


def overall_table(s: dict[str, Any], watch: dict[str, float] | None = None) -> Table:
    o, counters = s.get("overall") or {}, s.get("requests") or {}
    t = Table(title=f"exegpt stats -- model {s.get('model')}, up {fmt(s.get('uptime_s'))} s",
              show_header=False, title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value")
    window = o.get("throughput") or {}
    since = o.get("throughput_since_start") or {}
    codes = ", ".join(f"{k} {v}" for k, v in (o.get("failed") or {}).items())
    t.add_row("requests", f"completed {counters.get('completed')}, failed "
              f"{counters.get('failed')}{f' ({codes})' if codes else ''}, in flight "
              f"{counters.get('in_flight')}, queued {counters.get('queued')}")
    t.add_row("throughput (window)", f"{fmt(window.get('seq_s'))} seq/s, "
              f"{fmt(window.get('tok_s'))} tok/s over {fmt(window.get('span_s'))} s "
              f"({_get(s, 'window', 'requests')} requests)")
    t.add_row("throughput (since start)", f"{fmt(since.get('seq_s'))} seq/s, "
              f"{fmt(since.get('tok_s'))} tok/s")
    if watch:
        t.add_row("throughput (last refresh)", f"{fmt(watch['seq_s'])} seq/s, "
                  f"{fmt(watch['tok_s'])} tok/s")
    p99 = o.get("p99_length") or {}
    t.add_row("p99-length latency", f"{fmt(p99.get('latency_s'))} s mean, "
              f"{fmt(p99.get('max_s'))} s max from encode start; {fmt(p99.get('e2e_max_s'))} s "
              f"max from arrival ({p99.get('count')} requests of >= {p99.get('output_len')} "
              "tokens)")
    enc = o.get("encode_batches") or {}
    t.add_row("encode batches", f"{enc.get('count')} sent, mean size {fmt(enc.get('mean'))}, "
              f"recent {_series([b['size'] for b in enc.get('recent') or []])}")
    dec = o.get("decode_batch") or {}
    sizes = [p[1] for p in dec.get("series") or []]
    t.add_row("decode batch", f"{fmt(dec.get('per_step_mean'))} sequences per decode step; "
              f"running on the mesh: mean {fmt(dec.get('mean'))}, max {fmt(dec.get('max'))}, "
              f"over time {_series(sizes)}")
    adj = o.get("be_adjustments") or {}
    recent = "; ".join(f"{a['size']} ({a['reason']})" for a in (adj.get("recent") or [])[-4:])
    t.add_row("B_E adjustments", f"{adj.get('count')}" + (f", recent: {recent}" if recent else ""))
    kv = o.get("kv_bytes") or {}
    t.add_row("KV bytes moved", f"sent {fmt_bytes(kv.get('sent'))} ({fmt(kv.get('sent'))}), "
              f"received {fmt_bytes(kv.get('received'))} ({fmt(kv.get('received'))})")
    return t


LATENCY_ROWS = (("latency (arrival -> finish)", "latency_s", 1.0, "s"),
                ("latency (encode -> finish)", "latency_encode_s", 1.0, "s"),
                ("queueing", "queueing_s", 1e3, "ms"),
                ("TTFT (arrival)", "ttft_s", 1e3, "ms"),
                ("TTFT (encode start)", "ttft_encode_s", 1e3, "ms"),
                ("time per output token", "tpot_s", 1e3, "ms"),
                ("encode pass", "encode_s", 1e3, "ms"),
                ("KV transfer", "kv_transfer_s", 1e3, "ms"),
                ("output tokens", "output_len", 1.0, ""))


def latency_table(s: dict[str, Any]) -> Table:
    o = s.get("overall") or {}
    t = Table(title="latency over the window", title_justify="left")
    for name in ("", "p50", "p90", "p99", "mean", "max", "n"):
        t.add_column(name, justify="left" if not name else "right")
    for label, key, scale, unit in LATENCY_ROWS:
        d = o.get(key) or {}
        t.add_row(f"{label} {unit}".strip(), *(fmt(d.get(k), scale) for k in (
            "p50", "p90", "p99", "mean", "max")), fmt(d.get("count")))
    return t


def worker_table(s: dict[str, Any]) -> Table:
    """One row per worker (or pipeline stream): decoders' requests and running batch,
    encoders' batches, KV bytes each side moved."""
    t = Table(title="per worker", title_justify="left")
    for name in ("worker", "role", "requests", "seq/s", "tok/s", "lat p50/p99 s", "TTFT ms",
                 "TPOT ms", "batches", "KV bytes"):
        t.add_column(name, justify="left" if name in ("worker", "role") else "right")
    for wid, w in (s.get("per_worker") or {}).items():
        role = w.get("role") or ("stream" if w.get("passes") else "?")
        enc = w.get("encode_batches") or {}
        if enc.get("count"):
            batches = f"{enc['count']} x {fmt(enc.get('mean'))}"
        else:
            mean = _get(w, "decode_batch", "per_step_mean")
            batches = "n/a" if mean is None else f"{fmt(mean)} per step"
        kv = w.get("kv_bytes_sent") if role == "encoder" else w.get("kv_bytes_received")
        t.add_row(wid, f"{role} ({w.get('state')})",
                  fmt(w.get("encoded") if role == "encoder" else w.get("decoded")),
                  fmt(_get(w, "throughput", "seq_s")), fmt(_get(w, "throughput", "tok_s")),
                  f"{fmt(_get(w, 'latency_s', 'p50'))}/{fmt(_get(w, 'latency_s', 'p99'))}",
                  fmt(_get(w, "ttft_s", "p50"), 1e3), fmt(_get(w, "tpot_s", "p50"), 1e3),
                  batches, ("sent " if role == "encoder" else "recv ") + fmt_bytes(kv))
    return t


def compute_table(s: dict[str, Any]) -> Table:
    """Each worker's compute since it started, on the wall and on its thread's CPU clock
    (``common/busyclock.py``): their ratio, the CPU stretch, is 1.0 when the worker had a core
    to itself and grows as other processes take its core (docs/bench.md)."""
    t = Table(title="worker compute (since start)", title_justify="left")
    for name in ("worker", "role", "passes", "busy s", "CPU s", "CPU stretch", "ms / pass"):
        t.add_column(name, justify="left" if name in ("worker", "role") else "right")
    for w in s.get("workers") or []:
        load = w.get("load") or {}
        busy, cpu = load.get("busy_s"), load.get("busy_cpu_s")
        passes = load.get("passes") or load.get("steps") or load.get("batches_done")
        t.add_row(str(w.get("worker_id")), str(w.get("role")), fmt(passes), fmt(busy),
                  fmt(cpu), fmt(busy / cpu if busy is not None and cpu else None),
                  fmt(busy / passes if busy is not None and passes else None, 1e3))
    return t


def plan_table(s: dict[str, Any]) -> Table:
    plan, vp = s.get("plan") or {}, s["vs_plan"]
    bound = vp.get("latency_bound") or {}
    t = Table(title=f"measured vs plan ({plan.get('policy')}, B_E {plan.get('B_E')}, "
              f"workload {plan.get('workload')})", title_justify="left",
              caption=f"latency bound {fmt(bound.get('bound_s'))} s (SLA {bound.get('sla')}): "
                      f"measured {fmt(bound.get('measured_s'))} s, met: {fmt(bound.get('met'))}",
              caption_justify="left")
    for name in ("metric", "measured", "predicted", "measured/predicted"):
        t.add_column(name, justify="left" if name == "metric" else "right")
    for row in vp.get("rows") or []:
        t.add_row(row["metric"], fmt(row["measured"]), fmt(row["predicted"]),
                  fmt(row["ratio"]))
    return t


def request_table(s: dict[str, Any]) -> Table:
    lives, info = s["lifecycles"], s.get("request_info") or {}
    shown = min(RECENT_REQUESTS_SHOWN, len(lives))
    t = Table(title=f"recent requests (last {shown} of {len(lives)} reported; "
              "--json has every timestamp)", title_justify="left")
    for name in ("req_id", "encoder", "decoder", "prompt", "output", "queued ms", "encode ms",
                 "KV ms", "TTFT ms", "total ms"):
        t.add_column(name, justify="left" if name in ("req_id", "encoder", "decoder")
                     else "right")
    for req_id, life in list(lives.items())[-RECENT_REQUESTS_SHOWN:]:
        i = info.get(req_id, {})
        t.add_row(req_id[:16], str(i.get("encoder")), str(i.get("decoder")),
                  fmt(i.get("prompt_len")), fmt(len(life["t_tokens"])),
                  _ms(life, "t_arrival", "t_encode_start"),
                  _ms(life, "t_encode_start", "t_encode_end"),
                  _ms(life, "t_kv_sent", "t_kv_received"),
                  _ms(life, "t_arrival", "t_first_token"), _ms(life, "t_arrival", "t_finish"))
    return t


def _ms(life: dict[str, Any], a: str, b: str) -> str:
    if life.get(a) is None or life.get(b) is None:
        return "n/a"
    return f"{(life[b] - life[a]) * 1e3:.3g}"


def _series(values: Sequence[Any], limit: int = 12) -> str:
    if not values:
        return "n/a"
    head = [fmt(v, digits=3) for v in values[-limit:]]
    return ("... " if len(values) > limit else "") + " ".join(head)
