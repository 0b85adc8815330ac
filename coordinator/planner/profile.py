"""XProfiler tables: one row per measurement, queried by piecewise-linear interpolation.

Row format (JSON): ``{op, tp, batch, seq_len, tokens, bytes, time_s}``; fields an op does not
use are 0. Ops and their grid:

- ``enc_layer_attn`` (batch, seq_len): attention of ONE encode-pass layer over ``batch``
  sequences of ``seq_len`` tokens (T5: an encoder layer; decoder-only: a decoder layer in prefill).
- ``dec_layer_attn`` (batch, seq_len): attention of ONE decode step of one decoder layer, each
  of ``batch`` sequences attending to ``seq_len`` cached tokens (T5: self + cross context).
- ``enc_layer_rest`` / ``dec_layer_rest`` (tokens): the rest of that layer (projections, FFN,
  norms) for ``tokens`` tokens.
- ``embed``, ``lm_head`` (tokens), per tp; ``allreduce`` (bytes, one call) per tp;
  ``stage_send`` and ``kv_handoff`` (bytes, tp=1).

Costs are made monotone in size (running maximum: noise that says a bigger batch is cheaper
is flattened). Above the grid, 1-D tables extrapolate with the larger of the last segment's
and the whole grid's slope (costs are affine in size there) and attention scales in proportion
to batch and context; below the grid we clamp to the first point (fixed launch costs).
"""

from __future__ import annotations

import json
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.models.config import ModelConfig

ATTN_OPS = ("enc_layer_attn", "dec_layer_attn")
TOKEN_OPS = ("enc_layer_rest", "dec_layer_rest", "embed", "lm_head")
BYTE_OPS = ("allreduce", "stage_send", "kv_handoff")
ALL_OPS = ATTN_OPS + TOKEN_OPS + BYTE_OPS
META_KEYS = ("device", "dtype", "torch_version", "num_threads", "model", "date", "source")
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


class ProfileMismatch(ValueError):
    """The profile was made for another model or dtype than the one being planned."""


def _axis(xs: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Segment index and weight; weight < 0 is clamped, > 1 extrapolates the last segment."""
    if xs.size == 1:
        return np.zeros(np.shape(x), dtype=np.intp), np.zeros(np.shape(x))
    i = np.searchsorted(xs, x, side="right") - 1
    i = np.minimum(np.maximum(i, 0), xs.size - 2)
    w = (x - xs[i]) / (xs[i + 1] - xs[i])
    return i, np.maximum(w, 0.0)


def _axis_scalar(xs: list[float], x: float) -> tuple[int, float]:
    if len(xs) == 1:
        return 0, 0.0
    i = min(max(bisect_right(xs, x) - 1, 0), len(xs) - 2)
    return i, max((x - xs[i]) / (xs[i + 1] - xs[i]), 0.0)


@dataclass
class _Table1D:
    xs: np.ndarray
    ys: np.ndarray

    def __post_init__(self) -> None:
        # Cost never falls with size: measurement noise that says otherwise is flattened
        # (running maximum) so that interpolation and extrapolation stay monotone.
        self.ys = np.maximum.accumulate(self.ys)
        self.xl, self.yl = self.xs.tolist(), self.ys.tolist()
        if self.xs.size > 1:
            last = (self.ys[-1] - self.ys[-2]) / (self.xs[-1] - self.xs[-2])
            chord = (self.ys[-1] - self.ys[0]) / (self.xs[-1] - self.xs[0])
            self.tail = float(max(last, chord))  # slope beyond the grid

    def scalar(self, x: float) -> float:
        if len(self.xl) == 1:
            return self.yl[0] * max(x, 1.0) / max(self.xl[0], 1.0)
        if x > self.xl[-1]:
            return self.yl[-1] + (x - self.xl[-1]) * self.tail
        i, w = _axis_scalar(self.xl, x)
        return self.yl[i] + w * (self.yl[i + 1] - self.yl[i])

    def __call__(self, x: np.ndarray | float) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if self.xs.size == 1:
            return self.ys[0] * np.maximum(x, 1.0) / max(self.xs[0], 1.0)
        inside = np.interp(x, self.xs, self.ys)  # clamps below the grid, as intended
        return inside + np.maximum(x - self.xs[-1], 0.0) * self.tail


@dataclass
class _Table2D:
    bs: np.ndarray
    ss: np.ndarray
    grid: np.ndarray  # grid[batch index, seq index]

    def __post_init__(self) -> None:
        # monotone in both sizes (see _Table1D); beyond the grid attention scales in
        # proportion to batch and to context (decode attention is linear in both)
        self.grid = np.maximum.accumulate(np.maximum.accumulate(self.grid, axis=0), axis=1)
        self.bl, self.sl, self.gl = self.bs.tolist(), self.ss.tolist(), self.grid.tolist()

    def scalar(self, batch: float, seq: float) -> float:
        scale = max(batch / self.bl[-1], 1.0) * max(seq / self.sl[-1], 1.0)
        batch, seq = min(batch, self.bl[-1]), min(seq, self.sl[-1])
        i, wi = _axis_scalar(self.bl, batch)
        j, wj = _axis_scalar(self.sl, seq)
        g = self.gl
        i1, j1 = min(i + 1, len(self.bl) - 1), min(j + 1, len(self.sl) - 1)
        low = g[i][j] + wj * (g[i][j1] - g[i][j])
        high = g[i1][j] + wj * (g[i1][j1] - g[i1][j])
        return (low + wi * (high - low)) * scale

    def __call__(self, batch: np.ndarray | float, seq: np.ndarray | float) -> np.ndarray:
        batch, seq = np.broadcast_arrays(np.asarray(batch, np.float64), np.asarray(seq, np.float64))
        scale = np.maximum(batch / self.bs[-1], 1.0) * np.maximum(seq / self.ss[-1], 1.0)
        batch, seq = np.minimum(batch, self.bs[-1]), np.minimum(seq, self.ss[-1])
        i, wi = _axis(self.bs, batch)
        j, wj = _axis(self.ss, seq)
        g = self.grid
        i1 = np.minimum(i + 1, self.bs.size - 1)
        j1 = np.minimum(j + 1, self.ss.size - 1)
        low = g[i, j] + wj * (g[i, j1] - g[i, j])
        high = g[i1, j] + wj * (g[i1, j1] - g[i1, j])
        return (low + wi * (high - low)) * scale


@dataclass
class Profile:
    """Metadata plus tidy rows; build once, query many times (microseconds per query)."""

    meta: dict[str, Any]
    rows: list[dict[str, Any]]
    _tables: dict[tuple[str, int], Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        missing = [k for k in META_KEYS if k not in self.meta]
        if missing:
            raise ValueError(f"profile metadata lacks {missing}")
        if self.meta["dtype"] not in DTYPE_BYTES:
            raise ValueError(f"profile dtype {self.meta['dtype']!r} not in {list(DTYPE_BYTES)}")
        for row in self.rows:
            if row.get("op") not in ALL_OPS:
                raise ValueError(f"unknown profile op {row.get('op')!r}; ops: {ALL_OPS}")
        self._build()

    # ---- construction -----------------------------------------------------------------------
    def _build(self) -> None:
        groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for row in self.rows:
            groups.setdefault((row["op"], int(row["tp"])), []).append(row)
        for key, rows in groups.items():
            op = key[0]
            if op in ATTN_OPS:
                self._tables[key] = _grid(rows)
            else:
                col = "bytes" if op in BYTE_OPS else "tokens"
                pts = sorted({float(r[col]): float(r["time_s"]) for r in rows}.items())
                self._tables[key] = _Table1D(np.array([p[0] for p in pts]),
                                             np.array([p[1] for p in pts]))

    @property
    def model(self) -> ModelConfig:
        if "_model" not in self.__dict__:
            self.__dict__["_model"] = ModelConfig.from_dict(self.meta["model"])
        return self.__dict__["_model"]

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.meta["dtype"]]

    @property
    def tp_sizes(self) -> list[int]:
        return sorted({tp for (op, tp) in self._tables if op == "dec_layer_rest"})

    @property
    def memory_bytes(self) -> float:
        """Usable memory of one worker (GPU HBM, or a CPU worker's share of RAM)."""
        return float(self.meta.get("memory_bytes", float("inf")))

    def check_compatible(self, model: ModelConfig | None = None, dtype: str | None = None) -> None:
        if model is not None and _shape(model.to_dict()) != _shape(self.meta["model"]):
            raise ProfileMismatch(
                f"profile is for model {self.meta['model'].get('name') or 'unnamed'!r}, not "
                f"{model.name or 'the requested model'!r}: profile this model first")
        if dtype is not None and dtype != self.meta["dtype"]:
            raise ProfileMismatch(f"profile dtype is {self.meta['dtype']}, not {dtype}: "
                                  "profile again with --dtype " + dtype)

    # ---- queries ----------------------------------------------------------------------------
    def _table(self, op: str, tp: int) -> Any:
        table = self._tables.get((op, tp))
        if table is None and op in ("stage_send", "kv_handoff"):
            table = self._tables.get((op, 1))
        if table is None:
            raise ValueError(f"profile has no rows for op {op!r} at tp={tp}; "
                             f"profiled tp sizes: {self.tp_sizes}")
        return table

    # Queries take floats or numpy arrays (the simulator evaluates whole cycles at once);
    # a zero size costs nothing.
    def attn(self, phase: str, tp: int, batch: Any, seq_len: Any) -> Any:
        if isinstance(batch, float | int) and isinstance(seq_len, float | int):
            table = self._table(f"{phase}_layer_attn", tp)
            return table.scalar(batch, seq_len) if batch > 0 else 0.0
        batch = np.asarray(batch, np.float64)
        out = self._table(f"{phase}_layer_attn", tp)(batch, seq_len)
        return np.where(batch > 0, out, 0.0)

    def rest(self, phase: str, tp: int, tokens: Any) -> Any:
        if isinstance(tokens, float | int):
            return self._table(f"{phase}_layer_rest", tp).scalar(tokens) if tokens > 0 else 0.0
        tokens = np.asarray(tokens, np.float64)
        return np.where(tokens > 0, self._table(f"{phase}_layer_rest", tp)(tokens), 0.0)

    def op(self, op: str, tp: int, size: Any) -> np.ndarray:
        """embed/lm_head by tokens; allreduce/stage_send/kv_handoff by bytes."""
        if isinstance(size, float | int):
            if size <= 0 or (op == "allreduce" and tp == 1):
                return 0.0
            return self._table(op, tp).scalar(size)
        size = np.asarray(size, np.float64)
        if op == "allreduce" and tp == 1:
            return np.zeros(size.shape)
        return np.where(size > 0, self._table(op, tp)(size), 0.0)

    # ---- persistence ------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"meta": self.meta, "rows": self.rows}, indent=1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def from_json(cls, text: str) -> Profile:
        data = json.loads(text)
        if not isinstance(data, dict) or "meta" not in data or "rows" not in data:
            raise ValueError("a profile JSON needs top-level 'meta' and 'rows'")
        return cls(meta=data["meta"], rows=data["rows"])

    @classmethod
    def load(cls, path: str | Path, model: ModelConfig | None = None,
             dtype: str | None = None) -> Profile:
        path = Path(path)
        if not path.exists():
            raise ValueError(f"profile {path} does not exist; run `exegpt profile` first")
        profile = cls.from_json(path.read_text())
        profile.check_compatible(model, dtype)
        return profile


def _grid(rows: list[dict[str, Any]]) -> _Table2D:
    bs = sorted({float(r["batch"]) for r in rows})
    ss = sorted({float(r["seq_len"]) for r in rows})
    cells = {(float(r["batch"]), float(r["seq_len"])): float(r["time_s"]) for r in rows}
    missing = [(b, s) for b in bs for s in ss if (b, s) not in cells]
    if missing:
        raise ValueError(f"attention rows must form a full (batch, seq_len) grid; missing "
                         f"{missing[:3]}{'...' if len(missing) > 3 else ''}")
    grid = np.array([[cells[(b, s)] for s in ss] for b in bs])
    return _Table2D(np.array(bs), np.array(ss), grid)


def _shape(model: dict[str, Any]) -> dict[str, Any]:
    """The fields that decide cost and memory; a renamed but identical model still matches."""
    keys = ("family", "vocab_size", "hidden_size", "num_layers", "num_encoder_layers",
            "num_heads", "num_kv_heads", "head_dim", "ffn_size")
    return {k: model.get(k) for k in keys}
