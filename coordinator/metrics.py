"""What the coordinator measures while it serves, in bounded memory, for `exegpt stats`.

The coordinator calls one hook per event; a StatsRequest reads :meth:`Metrics.snapshot`::

    finish(request)            on_finish       the window of finished requests (lifecycles)
    fail(request, error)       on_fail         failures by error code
    schedule(): batch sent     on_encode_batch encode batch sizes, B_E adjustments (+ reason)
    pipeline PassDone          on_pass         pass sizes per stream, compute time per stage
    worker Heartbeat           on_worker_load  running batch over time, KV bytes counters
    StatsRequest               snapshot()      overall + per worker, beside the plan
                               lifecycles()    the recent requests' timestamps (Stats.requests)

Memory is bounded whatever the uptime: the window keeps the last ``window_requests`` finished
requests and at most ``window_token_stamps`` per-token stamps (8 bytes each; the oldest requests
leave first), every per-worker series and recent list is a ring. Totals since start are plain
counters. The numbers themselves are computed in ``coordinator/metrics_report.py``.
"""

from __future__ import annotations

import math
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.protocol import Lifecycle
from coordinator.metrics_report import (
    STAMPS,
    Frame,
    Record,
    Window,
    busy_mean,
    decode_batch_mean,
    distribution,
    json_safe,
    request_summary,
    step_sum,
    vs_plan,
)


@dataclass
class Track:
    """One worker's (or pipeline stream's) measurements."""

    series: deque[tuple[float, int]]  # (time, running sequences) from its heartbeats/passes
    step_series: deque[tuple[float, float]]  # (time, mean batch of its steps since the last)
    load: dict[str, Any] = field(default_factory=dict)  # latest Heartbeat.load
    steps: int = 0  # decode steps (iterations) it ran ...
    seq_steps: int = 0  # ... and the sequences in them summed: mean batch per step
    batches: int = 0  # encode batches (or encode passes) it ran
    requests: int = 0
    tokens: int = 0
    passes: Counter[str] = field(default_factory=Counter)


def load_plan(path: str | Path) -> dict[str, Any]:
    """A plan JSON (`exegpt plan --out`) as its dict; a clear ValueError when it is not one."""
    from coordinator.planner.plan import Plan

    try:
        return Plan.from_json(Path(path).read_text()).to_dict()
    except OSError as exc:
        raise ValueError(f"cannot read plan {path}: {exc.strerror or exc}") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} is not a plan JSON (`exegpt plan --out`): {exc}") from exc


@dataclass(frozen=True)
class Limits:
    """How much the metrics keep (memory) and return (message size); see docs/stats.md."""

    window_requests: int = 10_000  # finished requests in the window
    window_token_stamps: int = 2_000_000  # per-token stamps the window holds (8 bytes each)
    series_points: int = 600  # heartbeats / passes per worker's running-batch series
    recent: int = 64  # recent batches, adjustments, failures
    report_requests: int = 1000  # lifecycles per Stats answer ...
    report_token_stamps: int = 500_000  # ... and their token stamps (16 MiB body limit)

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if type(value) is not int or value < 1:
                raise ValueError(f"metrics limit {name} must be an int >= 1, got {value!r}")


class Metrics:
    """The hooks' state; see the module docstring."""

    def __init__(self, plan: dict[str, Any] | None = None, limits: Limits | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.plan, self.clock = plan, clock
        self.limits = limits = limits or Limits()
        self.t_start = clock()
        self._window = Window(limits.window_requests, limits.window_token_stamps)
        self._tracks: dict[str, Track] = {}
        self._batches: deque[dict[str, Any]] = deque(maxlen=limits.recent)
        self._adjustments: deque[dict[str, Any]] = deque(maxlen=limits.recent)
        self._failures: deque[dict[str, Any]] = deque(maxlen=limits.recent)
        self._stage_s: list[float] = []  # pipeline: compute seconds per stage, summed
        self.totals: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.t_first_arrival: float | None = None
        self.t_last_finish: float | None = None
        self.plan_switches: deque[dict[str, Any]] = deque(maxlen=limits.recent)
        self.t_plan: float | None = None  # when the served plan was switched (None: at start)

    def set_plan(self, plan: dict[str, Any], switch: dict[str, Any] | None = None) -> None:
        """The adapter switched the served plan (coordinator/adapt.py): from now on
        ``vs_plan`` compares the requests that ARRIVED after the switch with the new plan's
        predictions (the older ones were served, at least partly, with the old knobs);
        ``switch`` (time, reason, old/new knobs, cost) is kept in ``plan_switches``."""
        self.plan = plan
        self.t_plan = self.clock() if switch is None else float(switch.get("t", self.clock()))
        if switch is not None:
            self.plan_switches.append(dict(switch))

    # ---- hooks ----------------------------------------------------------------------------
    def on_finish(self, request: Any, reason: str = "length") -> None:
        """A request answered with its Result (``request``: coordinator.requests.Request)."""
        times = request.times
        record = Record(request.req_id, request.encoder, request.decoder,
                        request.num_prompt_tokens, reason,
                        tuple(_nan(getattr(times, name)) for name in STAMPS),
                        array("d", times.t_tokens))
        self._window.add(record)
        self.totals["completed"] += 1
        self.totals["tokens_out"] += record.output_len
        arrival, finish = times.t_arrival, times.t_finish
        if arrival is not None and (self.t_first_arrival is None
                                    or arrival < self.t_first_arrival):
            self.t_first_arrival = arrival
        if finish is not None and (self.t_last_finish is None or finish > self.t_last_finish):
            self.t_last_finish = finish

    def on_fail(self, request: Any, code: str) -> None:
        self.failed[code] += 1
        self._failures.append({"t": self.clock(), "req_id": request.req_id, "code": code,
                               "encoder": request.encoder, "decoder": request.decoder})

    def on_encode_batch(self, worker_id: str, size: int, tokens: int, adjusted: bool,
                        reason: str, now: float | None = None) -> None:
        """An encode batch (WAA) sent to ``worker_id``: ``size`` requests, ``tokens`` prompt
        tokens; ``adjusted`` when the dynamic B_E rule moved it off the plan's B_E."""
        now = self.clock() if now is None else now
        track = self._track(worker_id)
        track.batches += 1
        track.requests += size
        track.tokens += tokens
        batch = {"t": now, "worker": worker_id, "size": size, "tokens": tokens}
        self._batches.append(batch)
        if adjusted:
            self.totals["be_adjustments"] += 1
            self._adjustments.append({**batch, "reason": reason})

    def on_pass(self, stream: int | str, kind: str, size: int,
                stage_times: Sequence[float] = (), now: float | None = None) -> None:
        """A pipeline pass finished (PassDone): ``kind`` "encode" (``size`` requests, counted
        as an encode batch) or "decode" (``size`` sequences, the stream's running batch);
        ``stage_times`` = seconds each stage computed, stage 0 first."""
        now = self.clock() if now is None else now
        name = f"stream{stream}" if isinstance(stream, int) else stream
        track = self._track(name)
        track.passes[kind] += 1
        if kind == "encode":
            track.batches += 1
            track.requests += size
            self._batches.append({"t": now, "worker": name, "size": size, "tokens": None})
        else:
            track.series.append((now, size))
            track.step_series.append((now, float(size)))
            track.steps += 1
            track.seq_steps += size
        for stage, seconds in enumerate(stage_times):
            if stage >= len(self._stage_s):
                self._stage_s.extend([0.0] * (stage + 1 - len(self._stage_s)))
            self._stage_s[stage] += float(seconds)

    def on_worker_load(self, worker_id: str, load: dict[str, Any],
                       now: float | None = None) -> None:
        """A worker's heartbeat ``load``: its counters (KV bytes, decode steps and the
        sequences in them) and its running batch now."""
        now = self.clock() if now is None else now
        track = self._track(worker_id)
        track.load = dict(load)
        active, steps, seq_steps = load.get("active"), load.get("steps"), load.get("seq_steps")
        if type(active) is int:
            track.series.append((now, active))
        if type(steps) is int and type(seq_steps) is int:
            if steps > track.steps and seq_steps >= track.seq_steps:
                track.step_series.append((now, (seq_steps - track.seq_steps)
                                          / (steps - track.steps)))
            track.steps, track.seq_steps = steps, seq_steps

    def _track(self, name: str) -> Track:
        track = self._tracks.get(name)
        if track is None:
            points = self.limits.series_points
            track = self._tracks[name] = Track(deque(maxlen=points), deque(maxlen=points))
        return track

    # ---- reading --------------------------------------------------------------------------
    def snapshot(self, include_requests: bool = False,
                 workers: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
        """Overall and per-worker numbers (``workers``: the registry's worker descriptions,
        for role and state), beside the plan's predictions when a plan was given."""
        records = self._window.frame()
        overall = request_summary(records)
        overall["throughput_since_start"] = self._since_start()
        overall["failed"] = dict(self.failed)
        overall["recent_failures"] = list(self._failures)
        batches = list(self._batches)
        sizes = [b["size"] for b in batches]
        overall["encode_batches"] = {"count": sum(t.batches for t in self._tracks.values()),
                                     "mean": sum(sizes) / len(sizes) if sizes else None,
                                     "recent": batches}
        overall["be_adjustments"] = {"count": self.totals["be_adjustments"],
                                     "recent": list(self._adjustments)}
        overall["decode_batch"] = self._decode_batch()
        overall["kv_bytes"] = {key: self._load_sum(f"kv_bytes_{key}")
                               for key in ("sent", "received")}
        overall["stage_busy_s"] = list(self._stage_s)
        out: dict[str, Any] = {
            "uptime_s": self.clock() - self.t_start, "overall": overall,
            "per_worker": self._per_worker(records, {w["worker_id"]: w for w in workers}),
            "window": {"requests": len(records), "max_requests": self.limits.window_requests,
                       "token_stamps": self._window.token_stamps,
                       "max_token_stamps": self.limits.window_token_stamps},
            "plan": None, "vs_plan": None}
        if self.plan is not None:
            out["plan"] = json_safe({k: self.plan.get(k) for k in (
                "policy", "B_E", "B_D", "N_D", "B_m", "latency_bound_s", "sla", "workload",
                "num_workers", "predicted", "workload_info")})
            out["vs_plan"] = self._vs_plan(records, overall)
        out["plan_switches"] = json_safe(list(self.plan_switches))
        if include_requests:
            out["request_info"] = {r.req_id: {
                "encoder": r.encoder, "decoder": r.decoder, "prompt_len": r.prompt_len,
                "output_len": r.output_len, "reason": r.reason} for r in self._reported()}
        return out

    def _vs_plan(self, records: Frame, overall: dict[str, Any]) -> dict[str, Any]:
        """Measured beside the plan's predictions; after a switch, only the requests that
        arrived since (the batch means are the window's: they are not kept per request)."""
        assert self.plan is not None
        if self.t_plan is not None:
            since = records.where(records.col("t_arrival") >= self.t_plan)
            overall = {**overall, **request_summary(since)}
        out = vs_plan(self.plan, overall, overall["encode_batches"]["mean"],
                      decode_batch_mean(overall["decode_batch"]))
        out["since"] = self.t_plan
        out["requests"] = len(records) if self.t_plan is None else len(since)
        return out

    def lifecycles(self) -> dict[str, Lifecycle]:
        """The most recent finished requests' lifecycles, as many as fit the report budget."""
        return {r.req_id: Lifecycle(t_tokens=tuple(r.t_tokens),
                                    **{name: None if math.isnan(t) else t
                                       for name, t in zip(STAMPS, r.stamps, strict=True)})
                for r in self._reported()}

    def _reported(self) -> list[Record]:
        out, stamps, limits = [], 0, self.limits
        for record in reversed(self._window.records):
            stamps += record.output_len
            if len(out) >= limits.report_requests or (out and stamps > limits.report_token_stamps):
                break
            out.append(record)
        return out[::-1]

    def _since_start(self) -> dict[str, float | None]:
        first, last = self.t_first_arrival, self.t_last_finish
        if first is None or last is None or last <= first:
            return {"seq_s": None, "tok_s": None, "span_s": None}
        span = last - first
        return {"seq_s": self.totals["completed"] / span,
                "tok_s": self.totals["tokens_out"] / span, "span_s": span}

    def _decode_batch(self) -> dict[str, Any]:
        """Mesh-wide running batch over time: decoders' heartbeats, else pipeline streams'
        decode passes (a stage worker's heartbeat need not report ``active``)."""
        beats = {w: list(t.series) for w, t in self._tracks.items()
                 if t.series and not t.passes}
        streams = {w: list(t.series) for w, t in self._tracks.items() if t.passes}
        series = step_sum(beats or streams, self.limits.series_points)
        steps = sum(t.steps for t in self._tracks.values())
        return {"per_step_mean": sum(t.seq_steps for t in self._tracks.values()) / steps
                if steps else None,
                "mean": busy_mean(series), "max": max((n for _, n in series), default=None),
                "series": [list(p) for p in series]}

    def _load_sum(self, key: str) -> int | None:
        values = [t.load[key] for t in self._tracks.values() if type(t.load.get(key)) is int]
        return sum(values) if values else None

    def _per_worker(self, records: Frame, described: dict[str, dict[str, Any]],
                    ) -> dict[str, dict[str, Any]]:
        out = {}
        for name in sorted(set(self._tracks) | set(described)):
            track = self._tracks.get(name) or Track(deque(), deque())
            info = described.get(name, {})
            mine = records.where(records.decoder == name)
            encoded = records.where(records.encoder == name)
            summary = request_summary(mine) if len(mine) else None
            out[name] = {
                "role": info.get("role"), "state": info.get("state", "gone"),
                "decoded": len(mine), "encoded": len(encoded),
                "throughput": summary["throughput"] if summary else None,
                "latency_s": summary["latency_s"] if summary else None,
                "ttft_s": summary["ttft_s"] if summary else None,
                "tpot_s": summary["tpot_s"] if summary else None,
                "encode_s": distribution(encoded.span("t_encode_start", "t_encode_end")),
                "encode_batches": {"count": track.batches, "requests": track.requests,
                                   "tokens": track.tokens, "mean": track.requests / track.batches
                                   if track.batches else None},
                "passes": dict(track.passes),
                "decode_batch": {"per_step_mean": track.seq_steps / track.steps
                                 if track.steps else None,
                                 "per_step_series": [list(p) for p in track.step_series],
                                 "mean": busy_mean(track.series),
                                 "series": [list(p) for p in track.series]},
                "kv_bytes_sent": track.load.get("kv_bytes_sent"),
                "kv_bytes_received": track.load.get("kv_bytes_received"),
                "load": track.load}
        return out


def _nan(stamp: float | None) -> float:
    return math.nan if stamp is None else float(stamp)
