"""Branch-and-bound for monotonic optimisation over an integer grid (the paper's Algorithm 1).

Maximise f(x) subject to g(x) <= 1, where along every axis f and g are each monotone with a
known direction (+1: grows with the index, -1: shrinks). Over a box [lo, hi]:

- f is at most f(corner that maximises f): the box's upper bound;
- g is at least g(corner that minimises g): if that exceeds 1 + eps_L, nothing in it is feasible;
- if the f-maximising corner is feasible, it is the box's best point: no need to branch.

Boxes are explored best-bound first and pruned when their bound cannot beat the incumbent by
more than eps_T. The knobs are only *roughly* monotone (the paper measured 96-97% of grid points
at 5% tolerance), so eps_L keeps borderline boxes alive and small boxes are enumerated outright.

The scheduler solves many such problems (one per policy, TP degree and WAA worker layout) and
keeps the best answer. ``branch_and_bound_many`` runs them on one heap, best bound first across
all of them, and also prunes a box whose bound is *below* the best feasible f any problem has
found (the global incumbent). Each problem still processes its own boxes in the order it would
alone, with its own eps_T rule; it only stops once nothing it has left can reach the global
incumbent: under monotonicity what it would have found later is worse than the incumbent, so
the best answer over all problems is the one the separate searches give (ties included: the
global cut is strict). A problem's own answer may then be worse than alone (it stopped early).

Axes along which f is *not* monotone (``f_dir = 0``; measured profiles, monotone.py) need other
bounds, each valid without monotonicity:

- a ratio axis (``values`` given): f(x) / values[x_i] never rises along it (throughput / B_E
  is 1 / (time of a batch), and no cost falls with the batch). Over [lo, hi] f is at most
  f(lo) x values[hi] / values[lo];
- a free axis (no ``values``): nothing is assumed; the bound is the maximum over its range.

A box with such an axis is bounded by the maximum of f over its free axes' ranges, at its
ratio axes' lower ends and its monotone axes' f-maximising corner, times the ratio axes'
spans; a feasible top is then no longer the box's best point, so the box is split until its
bound falls to the incumbent or it is small enough to enumerate. g must still be monotone
along every axis (its directions prune infeasible boxes); then, with eps_T = 0, the answer is
exhaustive search's (tests/planner/test_bnb_nonmonotone.py).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import product

Point = tuple[int, ...]
Evaluate = Callable[[Point], tuple[float, float]]  # -> (objective f, constraint g)
Objective = Callable[[Point], float]  # -> f alone (cheaper: bounds need no constraint)


@dataclass(frozen=True)
class Axis:
    size: int
    f_dir: int  # +1: f grows with the index, -1: shrinks, 0: not monotone
    g_dir: int  # +1: g grows with the index
    # f_dir = 0 only: positive, increasing values with f / value non-increasing (a ratio
    # axis, e.g. the batch); None: a free axis
    values: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.size < 1 or self.f_dir not in (1, 0, -1) or self.g_dir not in (1, -1):
            raise ValueError(f"bad search axis {self}")
        if self.values is not None and (
                self.f_dir != 0 or len(self.values) != self.size or self.values[0] <= 0
                or any(b <= a for a, b in zip(self.values, self.values[1:], strict=False))):
            raise ValueError(f"a ratio axis needs f_dir 0 and {self.size} positive increasing "
                             f"values: {self}")


@dataclass
class BnBResult:
    best: Point | None
    best_f: float
    evaluated: int


@dataclass
class Problem:
    """One grid to search. ``objective`` (f alone) is used for bounds when it is cheaper than
    ``evaluate``; it must return exactly ``evaluate(x)[0]``. ``bound`` (optional) is an upper
    bound of f over the whole grid known without evaluating anything: the root then waits in
    the heap with that bound, and is never costed if the incumbent gets there first.
    ``g_floor`` (optional) never exceeds ``evaluate(x)[1]``: a point whose floor already
    answers "is g above this threshold" is not evaluated at all."""

    axes: Sequence[Axis]
    evaluate: Evaluate
    objective: Objective | None = None
    bound: float = math.inf
    g_floor: Objective | None = None  # a cheap lower bound of g (e.g. memory alone), or None


class _State:
    """One problem's memo and incumbent."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.full: dict[Point, tuple[float, float]] = {}
        self.f_only: dict[Point, float] = {}
        self.floors: dict[Point, float] = {}
        self.best: Point | None = None
        self.best_f = float("-inf")
        self.f_dirs = [a.f_dir for a in problem.axes]
        self.g_min_dirs = [-a.g_dir for a in problem.axes]
        self.g_max_dirs = [a.g_dir for a in problem.axes]
        self.monotone = all(d != 0 for d in self.f_dirs)
        self.bounds: dict[tuple[Point, Point], tuple[float, Point]] = {}

    def bound(self, lo: Point, hi: Point) -> tuple[float, Point]:
        """(upper bound of f over the box, the point it was taken at). Monotone: f at the
        f-maximising corner, exact; otherwise the module docstring's ratio / free bound."""
        if self.monotone:
            top = _corner(lo, hi, self.f_dirs)
            return self.f(top), top
        if (lo, hi) not in self.bounds:
            ranges: list[range] = []
            scale = 1.0
            for a, l_, h in zip(self.problem.axes, lo, hi, strict=True):
                if a.f_dir != 0:
                    ranges.append(range(h, h + 1) if a.f_dir > 0 else range(l_, l_ + 1))
                elif a.values is not None:
                    ranges.append(range(l_, l_ + 1))
                    scale *= a.values[h] / a.values[l_]
                else:
                    ranges.append(range(l_, h + 1))
            best, at = max((self.f(x), x) for x in product(*ranges))
            # margin: the scaled bound must not round below a point it bounds
            self.bounds[lo, hi] = (best * scale * (1.0 + 1e-12) if scale > 1 else best, at)
        return self.bounds[lo, hi]

    def ev(self, x: Point) -> tuple[float, float]:
        if x not in self.full:
            self.full[x] = self.problem.evaluate(x)
        return self.full[x]

    def f(self, x: Point) -> float:
        if x in self.full:
            return self.full[x][0]
        if self.problem.objective is None:
            return self.ev(x)[0]
        if x not in self.f_only:
            self.f_only[x] = self.problem.objective(x)
        return self.f_only[x]

    def floor_above(self, x: Point, threshold: float) -> bool:
        """g(x) > threshold is certain without evaluating x (its floor, or g if known)."""
        if x in self.full:
            return self.full[x][1] > threshold
        floor = self.problem.g_floor
        if floor is None:
            return False
        if x not in self.floors:
            self.floors[x] = floor(x)
        return self.floors[x] > threshold

    def g_above(self, x: Point, threshold: float) -> bool:
        """g(x) > threshold, from the floor when that settles it."""
        return self.floor_above(x, threshold) or self.ev(x)[1] > threshold

    def consider(self, x: Point) -> None:
        # the free memory floor first, then f alone (cheaper than g): a point that cannot
        # replace the incumbent is not costed further (a tie wins only at a smaller index, as
        # in ``exhaustive``)
        if self.floor_above(x, 1.0):
            return
        f = self.f(x)
        if f < self.best_f or (f == self.best_f and (self.best is None or x > self.best)):
            return
        if self.g_above(x, 1.0):
            return
        f, g = self.ev(x)
        if g <= 1.0 and (f > self.best_f or (f == self.best_f and self.best is not None
                                             and x < self.best)):
            self.best, self.best_f = x, f

    def evaluated(self) -> int:
        return len(self.full) + sum(1 for x in self.f_only if x not in self.full)


def _corner(lo: Point, hi: Point, dirs: Sequence[int]) -> Point:
    return tuple(h if d > 0 else lo_ for lo_, h, d in zip(lo, hi, dirs, strict=True))


def branch_and_bound(axes: Sequence[Axis], evaluate: Evaluate, *, eps_t: float = 0.005,
                     eps_l: float = 0.05, leaf_size: int = 8) -> BnBResult:
    return branch_and_bound_many([Problem(axes, evaluate)], eps_t=eps_t, eps_l=eps_l,
                                 leaf_size=leaf_size)[0]


def branch_and_bound_many(problems: Sequence[Problem], *, eps_t: float = 0.005,
                          eps_l: float = 0.05, leaf_size: int = 8) -> list[BnBResult]:
    states = [_State(p) for p in problems]
    incumbent = float("-inf")  # the best feasible f of any problem
    # Entries: (-bound, lazy, problem, box). A lazy entry's bound is an upper bound (its
    # parent's, or the problem's given bound) and its f-maximising corner is costed only when
    # it reaches the top: boxes pruned meanwhile cost nothing. A box is processed only with its
    # exact bound at the top, so boxes are processed best-bound first.
    heap: list[tuple[float, int, int, tuple[Point, Point]]] = []
    for i, (st, p) in enumerate(zip(states, problems, strict=True)):
        root = (tuple(0 for _ in p.axes), tuple(a.size - 1 for a in p.axes))
        if math.isfinite(p.bound):
            heap.append((-p.bound, 1, i, root))
        else:
            heap.append((-st.bound(*root)[0], 0, i, root))
    heapq.heapify(heap)
    while heap:
        neg_ub, lazy, i, (lo, hi) = heapq.heappop(heap)
        st = states[i]
        if -neg_ub <= st.best_f * (1.0 + eps_t) or -neg_ub < incumbent:
            continue
        if lazy:
            if st.floor_above(_corner(lo, hi, st.g_min_dirs), 1.0 + eps_l) and (
                    not st.monotone or st.floor_above(_corner(lo, hi, st.f_dirs), 1.0)):
                continue  # processing it would find nothing (see _process): skip its bound
            heapq.heappush(heap, (-st.bound(lo, hi)[0], 0, i, (lo, hi)))
            continue
        for child in _process(st, lo, hi, st.bound(lo, hi)[1], eps_l, leaf_size):
            heapq.heappush(heap, (neg_ub, 1, i, child))
        incumbent = max(incumbent, st.best_f)
    return [BnBResult(st.best, st.best_f, st.evaluated()) for st in states]


def _process(st: _State, lo: Point, hi: Point, top: Point, eps_l: float, leaf_size: int
             ) -> list[tuple[Point, Point]]:
    """Cost a box whose exact bound is at the top of the heap; return the boxes to split into.
    Without monotone f (``st.monotone`` False) a feasible top or a wholly feasible box does
    not settle the box: it is split like any other."""
    st.consider(top)
    if st.monotone and not st.g_above(top, 1.0):
        return []  # the box's best point is feasible
    low = _corner(lo, hi, st.g_min_dirs)
    if st.g_above(low, 1.0 + eps_l):
        return []  # nothing in the box meets the bound
    st.consider(low)
    if st.monotone and not st.g_above(_corner(lo, hi, st.g_max_dirs), 1.0):
        return []
    volume = 1
    for a, b in zip(lo, hi, strict=True):
        volume *= b - a + 1
    if volume <= leaf_size:
        for x in product(*(range(a, b + 1) for a, b in zip(lo, hi, strict=True))):
            st.consider(x)
        return []
    return _split(lo, hi)


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
