"""Branch and bound equals exhaustive search when throughput is not monotone in the batch.

The profile: SmolLM2-135M's analytic (roofline) profile on an A40, with the non-attention part
of each layer and the LM head made superlinear above 1,024 tokens (time x (tokens / 1,024)^0.6
there), as a measured CPU profile is when the working set leaves the cache. Throughput then
peaks at a moderate batch and falls beyond it; B&B that trusts the paper's monotone directions
misses the peak (checked below, so the premise of these tests is real), and the default search
(monotone.py finds the profile non-monotone) returns exhaustive search's plan.
"""

from __future__ import annotations

import math
import random

import pytest

from common.models.config import ModelConfig
from coordinator.planner.analytic import analytic_profile
from coordinator.planner.bnb import Axis, branch_and_bound, exhaustive
from coordinator.planner.candidate import WorkloadStats
from coordinator.planner.costs import Costs
from coordinator.planner.monotone import per_unit_costs_fall
from coordinator.planner.profile import Profile
from coordinator.planner.scheduler import search, tightest_latency
from coordinator.planner.workload import parse_workload

WORKLOAD = "name=S/4;in=normal:64,63,128;out=normal:32,13,80"
POLICIES = ("rra", "waa-c", "waa-m", "static", "continuous")
KNEE = 1024.0


def _superlinear_profile() -> Profile:
    base = analytic_profile("a40", ModelConfig.preset("smollm2-135m"), tp_sizes=(1,))
    rows = []
    for row in base.rows:
        row = dict(row)
        if row["op"] in ("enc_layer_rest", "dec_layer_rest", "lm_head") and row["tokens"] > KNEE:
            row["time_s"] *= (row["tokens"] / KNEE) ** 0.6
        rows.append(row)
    return Profile(dict(base.meta), rows)


@pytest.fixture(scope="module")
def profile() -> Profile:
    return _superlinear_profile()


def _key(res) -> tuple | None:  # noqa: ANN001
    if res.best is None:
        return None
    cand, m = res.best
    return cand, m.throughput_seq_s


def _search(profile: Profile, policy: str, bound: float, **kw) -> object:  # noqa: ANN003
    return search(WorkloadStats(parse_workload(WORKLOAD)), Costs(profile), 2, bound,
                  policies=(policy,), **kw)


def test_the_check_tells_roofline_from_superlinear_profiles(profile: Profile) -> None:
    assert per_unit_costs_fall(analytic_profile("a40", ModelConfig.preset("opt-13b")))
    assert not per_unit_costs_fall(profile)


def test_throughput_is_not_monotone_and_the_monotone_search_misses_the_peak(
        profile: Profile) -> None:
    missed = [p for p in POLICIES
              if _key(_search(profile, p, 1e18, f_monotone=True))
              != _key(_search(profile, p, 1e18, use_exhaustive=True))]
    assert missed, "the profile no longer breaks monotonicity: the tests below prove nothing"
    best = _search(profile, "waa-c", 1e18, use_exhaustive=True).best
    assert best is not None and best[0].B_E < 512


def _bounds(profile: Profile, policy: str) -> dict[str, float]:
    tight, _ = tightest_latency(WorkloadStats(parse_workload(WORKLOAD)), Costs(profile), 2,
                                policies=(policy,))
    free = _search(profile, policy, 1e18, use_exhaustive=True).best
    assert free is not None
    return {"none": 1e18, "middle": (tight + free[1].latency("b")) / 2, "tight": tight * 1.1}


@pytest.mark.parametrize(("policy", "cap"), [
    *((p, c) for p in POLICIES for c in (None, 60) if (p, c) != ("rra", 60)),
    pytest.param("rra", 60, marks=pytest.mark.slow)])  # a capped exhaustive RRA: ~8 s
def test_bnb_equals_exhaustive_without_monotone_throughput(profile: Profile, policy: str,
                                                          cap: int | None) -> None:
    for name, bound in _bounds(profile, policy).items():
        fast = _search(profile, policy, bound, max_in_flight=cap)
        slow = _search(profile, policy, bound, max_in_flight=cap, use_exhaustive=True)
        assert _key(fast) == _key(slow), (policy, name, cap)
        assert fast.evaluated <= slow.evaluated


def test_ratio_and_free_axes_on_random_non_monotone_functions() -> None:
    """f = B / T(B, n) with T growing in B (so f / B falls) but f itself rising and falling,
    n free (random), g monotone: B&B returns exhaustive's point on every instance."""
    rng = random.Random(7)
    for _ in range(200):
        nb, nn = rng.randint(1, 40), rng.randint(1, 12)
        values = tuple(float(v) for v in sorted(rng.sample(range(1, 600), nb)))
        steps = [rng.random() ** 3 for _ in range(nb)]
        base = [sum(steps[:i + 1]) for i in range(nb)]  # T's growth in B: any shape
        noise = [rng.uniform(0.5, 2.0) for _ in range(nn)]
        g_scale, g_n = rng.uniform(0.1, 3.0), [rng.uniform(0.5, 1.5) for _ in range(nn)]
        g_n.sort(reverse=True)

        def ev(x: tuple[int, ...], values=values, base=base, noise=noise, g_scale=g_scale,
               g_n=g_n, nb=nb) -> tuple[float, float]:
            b, n = x
            t = (0.2 + base[b]) * noise[n]
            return values[b] / t, g_scale * (b + 1) / nb * g_n[n]

        axes = [Axis(nb, 0, 1, values), Axis(nn, 0, -1)]
        fast, slow = branch_and_bound(axes, ev, eps_t=0.0, leaf_size=2), exhaustive(axes, ev)
        assert fast.best == slow.best and (fast.best_f == slow.best_f
                                           or math.isinf(slow.best_f))


@pytest.mark.parametrize("bad", [dict(values=(1.0, 2.0)), dict(values=(2.0, 1.0, 3.0)),
                                 dict(values=(0.0, 1.0, 2.0)), dict(f_dir=2)])
def test_bad_axes_are_refused(bad: dict) -> None:
    kw = {"size": 3, "f_dir": 0, "g_dir": 1} | bad
    with pytest.raises(ValueError):
        Axis(**kw)
