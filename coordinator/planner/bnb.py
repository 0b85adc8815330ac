"""Branch-and-bound for monotonic optimisation over an integer grid (the paper's Algorithm 1).

Maximise f(x) subject to g(x) <= 1, where along every axis f and g are each monotone with a
known direction (+1: grows with the index, -1: shrinks). Over a box [lo, hi]:

- f is at most f(corner that maximises f): the box's upper bound;
- g is at least g(corner that minimises g): if that exceeds 1 + eps_L, nothing in it is feasible;
- if the f-maximising corner is feasible, it is the box's best point: no need to branch.

Boxes are explored best-bound first and pruned when their bound cannot beat the incumbent by
more than eps_T. The knobs are only *roughly* monotone (the paper measured 96-97% of grid points
at 5% tolerance), so eps_L keeps borderline boxes alive and small boxes are enumerated outright.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import product

Point = tuple[int, ...]
Evaluate = Callable[[Point], tuple[float, float]]  # -> (objective f, constraint g)


@dataclass(frozen=True)
class Axis:
    size: int
    f_dir: int  # +1: f grows with the index
    g_dir: int  # +1: g grows with the index

    def __post_init__(self) -> None:
        if self.size < 1 or self.f_dir not in (1, -1) or self.g_dir not in (1, -1):
            raise ValueError(f"bad search axis {self}")


@dataclass
class BnBResult:
    best: Point | None
    best_f: float
    evaluated: int


class _Memo:
    def __init__(self, fn: Evaluate) -> None:
        self.fn, self.cache = fn, {}  # type: ignore[var-annotated]

    def __call__(self, x: Point) -> tuple[float, float]:
        if x not in self.cache:
            self.cache[x] = self.fn(x)
        return self.cache[x]


def _corner(lo: Point, hi: Point, dirs: Sequence[int]) -> Point:
    return tuple(h if d > 0 else lo_ for lo_, h, d in zip(lo, hi, dirs, strict=True))


def branch_and_bound(axes: Sequence[Axis], evaluate: Evaluate, *, eps_t: float = 0.005,
                     eps_l: float = 0.05, leaf_size: int = 8) -> BnBResult:
    ev = _Memo(evaluate)
    f_dirs = [a.f_dir for a in axes]
    g_min_dirs = [-a.g_dir for a in axes]
    g_max_dirs = [a.g_dir for a in axes]
    best: Point | None = None
    best_f = float("-inf")

    def consider(x: Point) -> None:
        nonlocal best, best_f
        f, g = ev(x)
        if g <= 1.0 and (f > best_f or (f == best_f and best is not None and x < best)):
            best, best_f = x, f

    root = (tuple(0 for _ in axes), tuple(a.size - 1 for a in axes))
    # Entries: (-bound, lazy, box). A child enters with its parent's bound (lazy = 1, an upper
    # bound of its own) and its f-maximising corner is only evaluated when it reaches the top:
    # boxes the incumbent prunes meanwhile cost nothing. A box is processed only with its exact
    # bound at the top, so boxes are still processed best-bound first.
    heap = [(-ev(_corner(*root, f_dirs))[0], 0, root)]
    while heap:
        neg_ub, lazy, (lo, hi) = heapq.heappop(heap)
        if -neg_ub <= best_f * (1.0 + eps_t):
            continue
        top = _corner(lo, hi, f_dirs)
        if lazy:
            heapq.heappush(heap, (-ev(top)[0], 0, (lo, hi)))
            continue
        consider(top)
        if ev(top)[1] <= 1.0:
            continue  # the box's best point is feasible
        low = _corner(lo, hi, g_min_dirs)
        if ev(low)[1] > 1.0 + eps_l:
            continue  # nothing in the box meets the bound
        consider(low)
        if ev(_corner(lo, hi, g_max_dirs))[1] <= 1.0:
            continue
        volume = 1
        for a, b in zip(lo, hi, strict=True):
            volume *= b - a + 1
        if volume <= leaf_size:
            for x in product(*(range(a, b + 1) for a, b in zip(lo, hi, strict=True))):
                consider(x)
            continue
        for child in _split(lo, hi):
            heapq.heappush(heap, (neg_ub, 1, child))
    return BnBResult(best, best_f, len(ev.cache))


def _split(lo: Point, hi: Point) -> list[tuple[Point, Point]]:
    dim = max(range(len(lo)), key=lambda i: hi[i] - lo[i])
    mid = (lo[dim] + hi[dim]) // 2
    left_hi = hi[:dim] + (mid,) + hi[dim + 1:]
    right_lo = lo[:dim] + (mid + 1,) + lo[dim + 1:]
    return [(lo, left_hi), (right_lo, hi)]


def exhaustive(axes: Sequence[Axis], evaluate: Evaluate) -> BnBResult:
    best: Point | None = None
    best_f = float("-inf")
    count = 0
    for x in product(*(range(a.size) for a in axes)):
        f, g = evaluate(x)
        count += 1
        if g <= 1.0 and f > best_f:
            best, best_f = x, f
    return BnBResult(best, best_f, count)
