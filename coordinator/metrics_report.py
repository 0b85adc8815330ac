"""The numbers `exegpt stats` shows, computed from finished-request records (pure functions).

Definitions (the planner's, so measured and predicted numbers mean the same thing; the paper
measures latency from the start of a request's encode, a user from its arrival):

    latency_s            arrival -> finish (end to end, queueing included)
    latency_encode_s     encode start -> finish (the paper's / the plan's latency)
    queueing_s           arrival -> encode start
    ttft_s               arrival -> first token;  ttft_encode_s: encode start -> first token
    tpot_s               (last token - first token) / (output tokens - 1), requests of >= 2 tokens
    p99_length           L = the window's p99 output length (nearest rank); over the requests with
                         >= L output tokens: the time from encode start to their L-th token
                         (``latency_s``: mean, what the simulator predicts; ``max_s``) and their
                         end-to-end latency to that token (``e2e_max_s``)
    throughput           window: requests / (last finish - first arrival) over the window;
                         since_start: every completed request since the first arrival

Percentiles are nearest-rank (every reported value was observed). A number with nothing to
measure it is ``None``; nothing is estimated.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)
STAMPS = ("t_arrival", "t_queued", "t_encode_start", "t_encode_end", "t_kv_sent",
          "t_kv_received", "t_first_token", "t_finish")


@dataclass(slots=True)
class Record:
    """One finished request as the window keeps it (token stamps in a compact array)."""

    req_id: str
    encoder: str | None
    decoder: str | None
    prompt_len: int
    reason: str
    stamps: tuple[float, ...]  # STAMPS order; NaN = not reached (arrays need no conversion)
    t_tokens: Sequence[float]

    @property
    def output_len(self) -> int:
        return len(self.t_tokens)


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float | None:
    """Nearest-rank percentile of the non-NaN ``values`` (None when there are none)."""
    arr = np.asarray(values, dtype=float)
    arr = np.sort(arr[~np.isnan(arr)])
    if arr.size == 0:
        return None
    return float(arr[max(1, math.ceil(q / 100 * arr.size)) - 1])


def distribution(values: Sequence[float] | np.ndarray) -> dict[str, float | None]:
    """p50/p90/p99, mean, max and count of the non-NaN ``values``."""
    arr = np.asarray(values, dtype=float)
    arr = np.sort(arr[~np.isnan(arr)])
    n = arr.size
    out: dict[str, Any] = {f"p{q}": float(arr[max(1, math.ceil(q / 100 * n)) - 1]) if n
                           else None for q in PERCENTILES}
    out["mean"] = float(arr.mean()) if n else None
    out["max"] = float(arr[-1]) if n else None
    out["count"] = int(n)
    return out


@dataclass(frozen=True)
class Frame:
    """The window as arrays (NaN = stamp not reached), in finish order."""

    records: Sequence[Record]
    stamps: np.ndarray  # [n, len(STAMPS)]
    out_len: np.ndarray  # [n]
    t_last: np.ndarray  # [n] the last token's stamp
    decoder: np.ndarray  # [n] object: worker ids ("" when none)
    encoder: np.ndarray

    def where(self, mask: np.ndarray) -> Frame:
        index = np.flatnonzero(mask)
        return Frame([self.records[i] for i in index], self.stamps[index], self.out_len[index],
                     self.t_last[index], self.decoder[index], self.encoder[index])

    def col(self, name: str) -> np.ndarray:
        return self.stamps[:, STAMPS.index(name)]

    def span(self, a: str, b: str) -> np.ndarray:
        return self.col(b) - self.col(a)

    def __len__(self) -> int:
        return len(self.records)


class Window:
    """The last finished requests, bounded by count and by per-token stamps held. Each
    request's scalars go into ring arrays as it finishes, so a snapshot of a full window costs
    array slicing, not a Python loop over 10,000 requests on the coordinator's event loop."""

    def __init__(self, max_requests: int, max_token_stamps: int) -> None:
        self.max_requests, self.max_token_stamps = max_requests, max_token_stamps
        self.records: deque[Record] = deque()
        self.token_stamps = 0
        self._head = 0  # ring row of records[0]
        self._stamps = np.full((max_requests, len(STAMPS)), math.nan)
        self._out_len = np.zeros(max_requests)
        self._t_last = np.full(max_requests, math.nan)
        self._decoder = np.full(max_requests, "", dtype=object)
        self._encoder = np.full(max_requests, "", dtype=object)

    def __len__(self) -> int:
        return len(self.records)

    def add(self, record: Record) -> None:
        if len(self.records) == self.max_requests:
            self._pop()
        row = (self._head + len(self.records)) % self.max_requests
        self._stamps[row] = record.stamps
        self._out_len[row] = record.output_len
        self._t_last[row] = record.t_tokens[-1] if record.output_len else math.nan
        self._decoder[row], self._encoder[row] = record.decoder or "", record.encoder or ""
        self.records.append(record)
        self.token_stamps += record.output_len
        while len(self.records) > 1 and self.token_stamps > self.max_token_stamps:
            self._pop()

    def _pop(self) -> None:
        self.token_stamps -= self.records.popleft().output_len
        self._head = (self._head + 1) % self.max_requests

    def frame(self) -> Frame:
        rows = (self._head + np.arange(len(self.records))) % self.max_requests
        return Frame(list(self.records), self._stamps[rows], self._out_len[rows],
                     self._t_last[rows], self._decoder[rows], self._encoder[rows])


def tpot(frame: Frame) -> np.ndarray:
    multi = frame.out_len > 1
    return (frame.t_last[multi] - frame.col("t_first_token")[multi]) / (frame.out_len[multi] - 1)


def p99_length(frame: Frame) -> dict[str, Any]:
    """The paper's latency: requests that reach the window's p99 output length."""
    length = percentile(frame.out_len, 99)
    if not length:
        return {"output_len": None, "count": 0, "latency_s": None, "max_s": None,
                "e2e_max_s": None}
    idx = int(length) - 1
    long = np.flatnonzero(frame.out_len >= length)
    at = np.array([frame.records[i].t_tokens[idx] for i in long], dtype=float)
    enc = at - frame.col("t_encode_start")[long]
    e2e = at - frame.col("t_arrival")[long]
    enc, e2e = enc[~np.isnan(enc)], e2e[~np.isnan(e2e)]
    return {"output_len": int(length), "count": int(long.size),
            "latency_s": float(enc.mean()) if enc.size else None,
            "max_s": float(enc.max()) if enc.size else None,
            "e2e_max_s": float(e2e.max()) if e2e.size else None}


def throughput(frame: Frame) -> dict[str, float | None]:
    arrival, finish = frame.col("t_arrival"), frame.col("t_finish")
    if not len(frame) or np.isnan(arrival).all() or np.isnan(finish).all():
        return {"seq_s": None, "tok_s": None, "span_s": None}
    span = float(np.nanmax(finish) - np.nanmin(arrival))
    if span <= 0:
        return {"seq_s": None, "tok_s": None, "span_s": None}
    return {"seq_s": len(frame) / span, "tok_s": float(frame.out_len.sum()) / span,
            "span_s": span}


def request_summary(frame: Frame) -> dict[str, Any]:
    """Every latency/throughput number over ``frame`` (the window, or one worker's part)."""
    return {
        "finished": len(frame), "throughput": throughput(frame),
        "latency_s": distribution(frame.span("t_arrival", "t_finish")),
        "latency_encode_s": distribution(frame.span("t_encode_start", "t_finish")),
        "queueing_s": distribution(frame.span("t_arrival", "t_encode_start")),
        "ttft_s": distribution(frame.span("t_arrival", "t_first_token")),
        "ttft_encode_s": distribution(frame.span("t_encode_start", "t_first_token")),
        "tpot_s": distribution(tpot(frame)),
        "encode_s": distribution(frame.span("t_encode_start", "t_encode_end")),
        "kv_transfer_s": distribution(frame.span("t_kv_sent", "t_kv_received")),
        "output_len": distribution(frame.out_len),
        "p99_length": p99_length(frame),
    }


def step_sum(series: dict[str, Sequence[tuple[float, int]]], limit: int,
             ) -> list[tuple[float, int]]:
    """The mesh-wide decode batch over time: at each heartbeat of any decoder, the sum of every
    decoder's latest reported running batch (the last ``limit`` points)."""
    events = sorted((t, wid, n) for wid, points in series.items() for t, n in points)
    latest: dict[str, int] = {}
    out = []
    for t, wid, n in events:
        latest[wid] = n
        out.append((t, sum(latest.values())))
    return out[-limit:]


def busy_mean(points: Sequence[tuple[float, int]]) -> float | None:
    """Mean running batch over the samples where something ran (idle samples say nothing
    about the batch size a schedule achieves)."""
    busy = [n for _, n in points if n > 0]
    return sum(busy) / len(busy) if busy else None


def decode_batch_mean(decode_batch: dict[str, Any]) -> float | None:
    """What the plan's B_D means (the simulator samples the batch at every decode step): the
    mean batch per step when workers count their steps, else the sampled running batch."""
    per_step = decode_batch.get("per_step_mean")
    return per_step if per_step is not None else decode_batch.get("mean")


# what each plan prediction is compared with: (plan key, path into the measured summary)
VS_PLAN = (
    ("throughput_seq_s", ("throughput", "seq_s")),
    ("throughput_tok_s", ("throughput", "tok_s")),
    ("latency_p99len_s", ("p99_length", "latency_s")),
    ("latency_p99_s", ("latency_encode_s", "p99")),
    ("ttft_s", ("ttft_encode_s", "mean")),
    ("tpot_s", ("tpot_s", "mean")),
)


def _dig(tree: dict[str, Any], path: Sequence[str]) -> Any:
    for key in path:
        tree = tree.get(key) if isinstance(tree, dict) else None  # type: ignore[assignment]
    return tree


def vs_plan(plan: dict[str, Any], overall: dict[str, Any], encode_mean: float | None,
            decode_mean: float | None) -> dict[str, Any]:
    """Measured beside predicted (ratio = measured / predicted) and the latency bound check
    (SLA b: the p99-length latency; SLA a: the p99 latency; both from encode start)."""
    predicted = plan.get("predicted") or {}
    rows = [_row(key, _dig(overall, path), predicted.get(key)) for key, path in VS_PLAN]
    rows.append(_row("B_E", encode_mean, plan.get("B_E")))
    rows.append(_row("B_D", decode_mean, plan.get("B_D")))
    sla = plan.get("sla", "b")
    measured = _dig(overall, ("p99_length", "latency_s") if sla == "b"
                    else ("latency_encode_s", "p99"))
    bound = plan.get("latency_bound_s")
    met = None if measured is None or bound is None else bool(measured <= bound)
    return {"rows": rows, "latency_bound": {"bound_s": bound, "sla": sla,
                                            "measured_s": measured, "met": met}}


def _row(metric: str, measured: Any, predicted: Any) -> dict[str, Any]:
    if not (isinstance(predicted, int | float) and math.isfinite(predicted)):
        predicted = None  # a plan may predict NaN (nothing reached the p99 length)
    ok = isinstance(measured, int | float) and predicted
    return {"metric": metric, "measured": measured, "predicted": predicted,
            "ratio": measured / predicted if ok else None}


def json_safe(tree: Any) -> Any:
    """``tree`` with NaN/inf floats as None (a plan may predict NaN; `--json` prints standard
    JSON)."""
    if isinstance(tree, float):
        return tree if math.isfinite(tree) else None
    if isinstance(tree, dict):
        return {k: json_safe(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [json_safe(v) for v in tree]
    return tree
