"""The K requests every policy of a run receives: drawn once from the workload, seeded.

Prompts are random token ids (the lengths are what the schedule sees; ids above the special
tokens so no prompt contains an end-of-sequence). Output lengths are the drawn lengths, enforced
by ignoring EOS up to them (the paper's method) unless natural EOS is asked for.

p99-length probes: the SLA-(b) latency is the time a request of the p99 output length takes,
and a draw of K requests holds on average K/100 of them. So the ceil(K/25) longest draws are
raised to at least the p99 length (as `exegpt up --demo` does). They are the draws closest to
p99 already, so the mean output length moves little (``probe_shift`` gives the change of a
draw; it is recorded in results.json).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

PROBE_FRACTION = 1 / 25
MIN_PROMPT_ID = 100  # above every special token of the supported tokenizers


@dataclass(frozen=True)
class BenchRequest:
    """One request: its prompt ids and the number of output tokens it must produce."""

    prompt_ids: tuple[int, ...]
    output_len: int
    probe: bool = False

    def __post_init__(self) -> None:
        if not self.prompt_ids or self.output_len < 1:
            raise ValueError("a bench request needs a prompt and output_len >= 1")

    def to_dict(self) -> dict[str, Any]:
        return {"input_len": len(self.prompt_ids), "output_len": self.output_len,
                "probe": self.probe}


def num_probes(num_requests: int) -> int:
    return max(1, math.ceil(num_requests * PROBE_FRACTION))


def draw_requests(workload: Any, num: int, seed: int, vocab_size: int,
                  max_context: int | None = None) -> list[BenchRequest]:
    """``num`` requests from ``workload`` (a planner Workload); same seed, same requests."""
    rng = np.random.default_rng(seed)
    ins, outs = workload.sample(rng, num)
    outs = np.asarray(outs, dtype=np.int64)
    probes = set(probe_indices(outs).tolist())
    outs = raise_probes(outs, workload.p99_output)
    low = min(MIN_PROMPT_ID, vocab_size // 2)
    out = []
    for i, (n_in, n_out) in enumerate(zip(ins.tolist(), outs.tolist(), strict=True)):
        n_in = max(1, int(n_in))
        if max_context is not None and n_in + n_out > max_context:
            n_in = max(1, max_context - n_out)
        ids = tuple(int(t) for t in rng.integers(low, vocab_size, size=n_in))
        out.append(BenchRequest(ids, int(n_out), i in probes))
    return out


def raise_probes(outs: np.ndarray, p99: int) -> np.ndarray:
    """The ceil(K/25) longest output lengths raised to at least ``p99`` (stable order)."""
    outs = outs.copy()
    for i in probe_indices(outs):
        outs[i] = max(int(outs[i]), int(p99))
    return outs


def probe_indices(outs: np.ndarray) -> np.ndarray:
    """Which requests become probes: the longest draws (ties: the earlier request)."""
    return np.argsort(-outs, kind="stable")[:num_probes(outs.size)]


def probe_shift(workload: Any, num: int, seed: int) -> float:
    """Relative change of the mean output length that the probes cause for this draw."""
    ins, outs = workload.sample(np.random.default_rng(seed), num)
    raw = np.asarray(outs, dtype=np.float64)
    return float(raise_probes(raw.astype(np.int64), workload.p99_output).mean() / raw.mean() - 1)
