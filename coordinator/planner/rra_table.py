"""RRA cycle quantities shared by many candidates, computed once (the search's hot loop).

Within one search, RRA candidates differ in B_E, N_D and the TP workers. What they share:

- the survival sums of a cycle, ``sum_c P(S >= c N_D + u)`` and the mean context at each
  offset u, and ``sum_c log P(S < c N_D + u)`` (a stream is empty at u with probability its
  exponential times B_E): they depend on the workload and N_D only (``cycle_sums``,
  ``cycle_log_empty``);
- the per-layer decode cost of every step of a cycle at a TP degree, and the embedding, LM head
  and stage-send costs: they depend on the batch (B_E times the sums), the context and tp, not
  on how the layers are split into stages. So ``decode_parts`` interpolates the profile for a
  block of neighbouring B_E values of ``batch_grid()`` at once (one numpy call on a B_E x N_D
  array instead of one per candidate) and keeps the tables; a candidate reads its row, shared
  by every TP-worker count. Every element goes through the same arithmetic as a one-row call,
  so results are identical to costing the candidate alone (tests/planner/
  test_simulator_golden.py).

Tables live on the ``Costs`` object, keyed by the workload, and are bounded in total size
(least recently used first out) so an exhaustive search cannot grow them without limit.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

from coordinator.planner.candidate import WorkloadStats
from coordinator.planner.costs import Costs

MAX_TABLE_FLOATS = 16_000_000  # 128 MB of float64 at most per Costs object (a search uses ~40)
BLOCK = 8  # grid B_E values costed together


def batch_grid(limit: int = 512) -> list[int]:
    """The B_E values the search tries: fine steps where batches are small, coarser above."""
    grid = list(range(1, 17)) + list(range(18, 33, 2)) + list(range(36, 129, 4))
    return [b for b in grid + list(range(136, 513, 8)) if b <= limit]


_GRID = np.array(batch_grid(), dtype=np.float64)
_ROW = {int(b): i for i, b in enumerate(_GRID)}


def _survival_grid(stats: WorkloadStats, n_d: int) -> np.ndarray:
    """[c, u - 1] = P(S >= c N_D + u): the survival function cut into cycles of N_D steps."""
    cycles = -(-stats.s_max // n_d)
    surv = np.zeros(cycles * n_d)
    surv[: stats.s_max] = stats.surv
    return surv.reshape(cycles, n_d)


def cycle_sums(stats: WorkloadStats, n_d: int) -> tuple[np.ndarray, np.ndarray]:
    """(sum over cycles of P(S >= c N_D + u), mean context) at offsets u = 1..N_D."""
    cache = stats.__dict__.setdefault("_cycle_sums", {})
    if n_d not in cache:
        grid = _survival_grid(stats, n_d)
        ages = np.arange(1, grid.size + 1, dtype=np.float64).reshape(grid.shape)
        sums = grid.sum(axis=0)
        mean_age = (grid * ages).sum(axis=0) / np.maximum(sums, 1e-300)
        cache[n_d] = (sums, stats.in_decode_weighted + mean_age)
    return cache[n_d]


def cycle_log_empty(stats: WorkloadStats, n_d: int) -> np.ndarray:
    """``sum_c log P(S < c N_D + u)`` at offsets u = 1..N_D: a stream that admitted B_E
    requests per cycle is empty at offset u with probability ``exp(B_E *`` this ``)``, each
    request admitted c cycles ago being alive there independently with P(S >= c N_D + u)."""
    cache = stats.__dict__.setdefault("_cycle_log_empty", {})
    if n_d not in cache:
        with np.errstate(divide="ignore"):  # certain survival: the stream is never empty
            cache[n_d] = np.log1p(-np.minimum(_survival_grid(stats, n_d), 1.0)).sum(axis=0)
    return cache[n_d]


def alive_probability(b_e: Any, log_empty: np.ndarray) -> Any:
    """P(a stream has a live sequence at each offset): ``1 - exp(B_E * log_empty)``."""
    return -np.expm1(np.multiply.outer(b_e, log_empty) if np.ndim(b_e) else b_e * log_empty)


def step_batches(batch: Any, alive: Any) -> Any:
    """The batch a decode step runs with. ``alive`` (the stream's ``alive_probability``): the
    expected batch given that the step runs at all; None: at least the request itself."""
    if alive is not None:
        return batch / np.maximum(alive, 1e-12)
    return np.maximum(batch, 1.0)


def decode_parts(costs: Costs, stats: WorkloadStats, tps: set[int], n_d: int, b_e: int,
                 alive_only: bool) -> tuple[dict[int, np.ndarray], dict[tuple[str, int], Any]]:
    """Per-layer decode cost per tp and the per-step ops (embed, LM head per tp; stage send)
    of each step u = 1..N_D of a cycle started by B_E requests: ``Costs.per_stage``'s inputs.

    Costed for a block of ``BLOCK`` neighbouring grid B_E values at once (the search moves
    locally, so neighbours are usually asked for next; an off-grid B_E gets a one-row block)."""
    index = _ROW.get(b_e)
    block = None if index is None else index // BLOCK
    key = (id(stats), tuple(sorted(tps)), n_d, alive_only, block if block is not None else -b_e)
    tables: _Tables = costs.__dict__.setdefault("_rra_tables", _Tables())
    parts = tables.get(key)
    if parts is None:
        sums, ctx = cycle_sums(stats, n_d)
        rows = (_GRID[block * BLOCK:(block + 1) * BLOCK] if block is not None
                else np.array([float(b_e)]))
        alive = alive_probability(rows, cycle_log_empty(stats, n_d)) if alive_only else None
        batch = step_batches(rows[:, None] * sums, alive)
        layers = {tp: costs._decode_layer(tp, batch, ctx) for tp in tps}
        ops = {(name, tp): costs.profile.op(name, tp, batch)
               for name in ("embed", "lm_head") for tp in tps}
        ops["stage_send", 1] = costs.profile.op("stage_send", 1, batch * costs.hidden_bytes)
        parts = (layers, ops)
        tables.put(key, stats, parts, batch.size * (len(layers) + len(ops)))
    i = index % BLOCK if index is not None else 0
    return {tp: t[i] for tp, t in parts[0].items()}, {k: t[i] for k, t in parts[1].items()}


class _Tables:
    """Least-recently-used tables bounded in total floats. Values keep their workload alive so
    that the ``id`` in a key cannot be reused by another workload while the entry exists."""

    def __init__(self) -> None:
        self.items: OrderedDict[Any, tuple[WorkloadStats, Any, int]] = OrderedDict()
        self.floats = 0

    def get(self, key: Any) -> Any:
        item = self.items.get(key)
        if item is None:
            return None
        self.items.move_to_end(key)
        return item[1]

    def put(self, key: Any, stats: WorkloadStats, value: Any, floats: int) -> None:
        self.items[key] = (stats, value, floats)
        self.floats += floats
        while self.floats > MAX_TABLE_FLOATS and len(self.items) > 1:
            _, (_, _, size) = self.items.popitem(last=False)
            self.floats -= size
