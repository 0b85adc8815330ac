"""Workloads: the joint law of (input length, output length) plus an optional arrival process.

Spec strings (``--workload``), tried in this order:
- a preset name: ``S``, ``T``, ``G``, ``C1``, ``C2`` (the paper's tasks);
- a scaled preset ``T/4``: every length law of the task divided by 4 (for CPUs);
- an inline spec: ``key=value`` pairs separated by ``;``:
  ``in=normal:256,252,512;out=normal:32,13,80`` (distributions: see lengths.parse_dist),
  ``preset=S;rate=4`` (a preset with Poisson arrivals at 4 requests/s);
- a file path: ``.jsonl`` or ``.csv`` trace (see :func:`load_trace`).

Independent marginals are the paper's assumption. A trace keeps its (input, output) pairs, so
correlated lengths (translation) are sampled jointly and every moment the simulator uses comes
from the pairs themselves.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coordinator.planner.lengths import LengthDist, empirical, parse_dist, truncated_normal

# task: (input avg, std, max), (output avg, std, max), the paper's p99 output length
PAPER_TASKS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int], int]] = {
    "S": ((256, 252, 512), (32, 13, 80), 63),
    "T": ((128, 81, 256), (128, 68, 320), 292),
    "G": ((64, 23, 128), (192, 93, 480), 417),
    "C1": ((256, 115, 512), (64, 30, 160), 137),
    "C2": ((512, 252, 1024), (256, 134, 640), 579),
}
TASK_NAMES = {"S": "summarisation", "T": "translation", "G": "code generation",
              "C1": "conversation (short)", "C2": "conversation (long)"}


@dataclass(frozen=True, eq=False)
class Arrival:
    """Poisson arrivals at ``rate`` req/s, or the given absolute ``timestamps`` (seconds)."""

    rate: float | None = None
    timestamps: np.ndarray | None = None

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.timestamps is None):
            raise ValueError("an arrival process needs exactly one of rate or timestamps")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"arrival rate must be > 0 req/s, got {self.rate}")

    def times(self, rng: np.random.Generator, num: int) -> np.ndarray:
        if self.rate is not None:
            return np.cumsum(rng.exponential(1.0 / self.rate, size=num))
        assert self.timestamps is not None
        ts = np.sort(self.timestamps) - np.min(self.timestamps)
        reps = -(-num // ts.size)
        span = ts[-1] + (ts[-1] / max(ts.size - 1, 1))
        tiled = np.concatenate([ts + k * span for k in range(reps)])
        return tiled[:num]

    @property
    def mean_rate(self) -> float:
        if self.rate is not None:
            return self.rate
        assert self.timestamps is not None
        span = float(np.ptp(self.timestamps))
        return (self.timestamps.size - 1) / span if span > 0 else float("inf")


@dataclass(frozen=True, eq=False)
class Workload:
    """Input/output length laws; ``pairs`` (n x 2 ints) means joint sampling from a trace."""

    name: str
    spec: str
    input: LengthDist
    output: LengthDist
    pairs: np.ndarray | None = None
    arrival: Arrival | None = None

    def __post_init__(self) -> None:
        if self.pairs is not None:
            pairs = np.asarray(self.pairs, dtype=np.int64)
            if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.shape[0] == 0:
                raise ValueError("trace pairs must be a non-empty (n, 2) array")
            if pairs.min() < 1:
                raise ValueError("trace lengths must be >= 1 token")
            object.__setattr__(self, "pairs", pairs)

    @property
    def p99_output(self) -> int:
        return self.output.quantile(0.99)

    @property
    def correlation(self) -> float:
        if self.pairs is None or self.pairs.shape[0] < 2:
            return 0.0
        c = np.corrcoef(self.pairs[:, 0], self.pairs[:, 1])[0, 1]
        return 0.0 if np.isnan(c) else float(c)

    def mean_input_times_output(self) -> float:
        """E[I*S]: with correlated lengths this differs from E[I]E[S]."""
        if self.pairs is not None:
            return float(np.mean(self.pairs[:, 0] * self.pairs[:, 1].astype(np.float64)))
        return self.input.mean * self.output.mean

    def sample(self, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
        if self.pairs is not None:
            idx = rng.integers(0, self.pairs.shape[0], size=size)
            return self.pairs[idx, 0], self.pairs[idx, 1]
        return self.input.sample(rng, size), self.output.sample(rng, size)

    def with_arrival(self, arrival: Arrival | None) -> Workload:
        return Workload(self.name, self.spec, self.input, self.output, self.pairs, arrival)

    def describe(self) -> str:
        corr = f", corr {self.correlation:.2f}" if self.pairs is not None else ""
        arr = f", arrivals {self.arrival.mean_rate:.3g}/s" if self.arrival else ", saturated"
        return (f"{self.name}: input {self.input.mean:.0f}+-{self.input.std:.0f} (max "
                f"{self.input.max}), output {self.output.mean:.0f}+-{self.output.std:.0f} "
                f"(p99 {self.p99_output}, max {self.output.max}){corr}{arr}")


def preset(name: str) -> Workload:
    if name not in PAPER_TASKS:
        raise ValueError(f"unknown workload preset {name!r}; presets: {sorted(PAPER_TASKS)}")
    (ia, isd, imx), (oa, osd, omx), _ = PAPER_TASKS[name]
    return Workload(name, name, truncated_normal(ia, isd, imx), truncated_normal(oa, osd, omx))


def scaled_preset(name: str, factor: int) -> Workload:
    """A paper task with every input and output length law divided by ``factor`` (avg, std and
    max alike): the paper's lengths are sized for GPUs; ``T/4`` is translation at a quarter of
    the tokens, for a CPU that needs minutes per paper-sized request."""
    if name not in PAPER_TASKS:
        raise ValueError(f"unknown workload preset {name!r}; presets: {sorted(PAPER_TASKS)}")
    if factor < 1:
        raise ValueError(f"a scaled preset divides lengths by an integer >= 1, got {factor}")
    laws = [truncated_normal(avg / factor, std / factor, max(1, top // factor))
            for avg, std, top in PAPER_TASKS[name][:2]]
    label = f"{name}/{factor}"
    return Workload(label, label, laws[0], laws[1])


def from_pairs(in_lens: np.ndarray, out_lens: np.ndarray, name: str,
               timestamps: np.ndarray | None = None) -> Workload:
    pairs = np.stack([np.asarray(in_lens), np.asarray(out_lens)], axis=1)
    arrival = Arrival(timestamps=np.asarray(timestamps, float)) if timestamps is not None else None
    return Workload(name, name, empirical(pairs[:, 0], f"trace-input:{name}"),
                    empirical(pairs[:, 1], f"trace-output:{name}"), pairs, arrival)


def _records(path: Path) -> list[dict[str, str]]:
    if path.suffix == ".jsonl":
        lines = path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    if path.suffix == ".csv":
        with path.open(newline="") as fh:
            return list(csv.DictReader(fh))
    raise ValueError(f"trace {path} must be .jsonl or .csv")


def load_trace(path: str | Path, tokenize: Callable[[str], list[int]] | None = None) -> Workload:
    """Records carry ``input_len`` (or ``prompt`` + a ``tokenize`` callable) and ``output_len``
    (or ``output`` text), and optionally ``timestamp`` (seconds) for the arrival process."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"workload trace {path} does not exist")
    ins, outs, stamps = [], [], []
    for num, rec in enumerate(_records(path), start=1):
        ins.append(_length(rec, "input_len", "prompt", tokenize, f"{path}:{num}"))
        outs.append(_length(rec, "output_len", "output", tokenize, f"{path}:{num}"))
        if rec.get("timestamp") not in (None, ""):
            stamps.append(float(rec["timestamp"]))
    if not ins:
        raise ValueError(f"trace {path} has no records")
    if stamps and len(stamps) != len(ins):
        raise ValueError(f"trace {path}: timestamp given on some records only")
    return from_pairs(np.array(ins), np.array(outs), path.stem,
                      np.array(stamps) if stamps else None)


def _length(rec: dict, len_key: str, text_key: str,
            tokenize: Callable[[str], list[int]] | None, where: str) -> int:
    if rec.get(len_key) not in (None, ""):
        return int(rec[len_key])
    if rec.get(text_key) is not None:
        if tokenize is None:
            raise ValueError(f"{where}: record has {text_key!r} text but no tokenizer was given; "
                             f"use `exegpt plan --tokenizer tokenizer.json` (tokenize= in "
                             f"Python) or store {len_key!r}")
        return max(len(tokenize(str(rec[text_key]))), 1)
    raise ValueError(f"{where}: record needs {len_key!r} (or {text_key!r} text)")


def parse_workload(spec: str, tokenize: Callable[[str], list[int]] | None = None) -> Workload:
    spec = spec.strip()
    if spec in PAPER_TASKS:
        return preset(spec)
    task, slash, factor = spec.partition("/")
    if slash and task in PAPER_TASKS and factor.isdigit():
        return scaled_preset(task, int(factor))
    if "=" in spec:
        return _inline(spec)
    if Path(spec).suffix in (".jsonl", ".csv"):
        return load_trace(spec, tokenize)
    raise ValueError(f"workload {spec!r} is not a preset {sorted(PAPER_TASKS)}, a scaled preset "
                     "like 'T/4' (lengths / 4), an inline spec "
                     "like 'in=normal:256,252,512;out=normal:32,13,80', or a .jsonl/.csv trace")


def _inline(spec: str) -> Workload:
    fields: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("in", "out", "rate", "preset", "name", "trace"):
            raise ValueError(f"bad workload field {part!r}; keys: in, out, rate, preset, "
                             "name, trace")
        fields[key.strip()] = value.strip()
    if "preset" in fields or "trace" in fields:
        base = preset(fields["preset"]) if "preset" in fields else load_trace(fields["trace"])
        if "in" in fields or "out" in fields:
            raise ValueError("give either preset=/trace= or in=/out=, not both")
    else:
        if "in" not in fields or "out" not in fields:
            raise ValueError(f"inline workload {spec!r} needs both in= and out=")
        base = Workload(fields.get("name", "custom"), spec, parse_dist(fields["in"]),
                        parse_dist(fields["out"]))
    arrival = Arrival(rate=float(fields["rate"])) if "rate" in fields else base.arrival
    return Workload(fields.get("name", base.name), spec, base.input, base.output, base.pairs,
                    arrival)
