"""How much a plan's prediction moves when the profile is a little off: its elasticities.

A prediction is only as good as the profile under it, and some schedules amplify a profile
error. The clearest case is a WAA plan whose encoder feeds the decoders at close to their
capacity: a decode round costs about ``a + k B`` at batch B, requests arrive at rate x and
need S tokens each, and the steady batch solves ``B = x S (a + k B)``, i.e.
``B = x S a / (1 - rho)`` with ``rho = x S k``. At rho = 0.8 a 5% error in the profile's
decode cost moves the batch, the time per token and the latency by ~25%; at rho = 0.93 by
more than 60%. No planner can predict such a plan's latency to within 5% from a profile
measured to within 5%, and the bench should say so next to the error rather than hide it.

``elasticities(plan, workload, profile)`` re-simulates the plan's own candidate (same policy,
knobs, TP layout and, for WAA, the same encoder/decoder split) with every compute time of the
profile ``1 + step`` times as long (the fixed per-pass overheads unchanged), and returns
d(ln figure) / d(ln compute) for the figures the bench compares: about -1 for throughput and
+1 for latency on a well-conditioned plan, far from that on a plan near a regime boundary.
"""

from __future__ import annotations

import math
from typing import Any

STEP = 0.05  # the compute-time perturbation: a 5% profile error, the bench's error goal
FIGURES = ("throughput_seq_s", "latency_p99len_s", "tpot_s", "ttft_s")
WELL_CONDITIONED = 2.0  # |latency elasticity| at most this: a 5% profile error moves <= 10%


def plan_candidate(plan: Any) -> Any:
    """The Candidate ``plan`` was made from (WAA: with its encoder count fixed)."""
    from coordinator.planner.candidate import Candidate

    encoders = sum(g.count for g in plan.worker_groups if g.role == "encoder")
    return Candidate(plan.policy, plan.num_workers, int(plan.search.get("tp", 1)),
                     int(plan.search.get("num_tp_workers", 0)), plan.B_E, plan.N_D or 1,
                     plan.B_m or 1, encoders if plan.policy.startswith("waa") else 0)


def predicted_under(plan: Any, workload: Any, profile: Any) -> dict[str, Any] | None:
    """``plan``'s candidate simulated on ``profile`` (None: infeasible there)."""
    from coordinator.planner.planning import predicted
    from coordinator.planner.simulator import simulate

    metrics = simulate(plan_candidate(plan), workload, profile)
    return predicted(metrics) if metrics.feasible else None


def elasticities(plan: Any, workload: Any, profile: Any, step: float = STEP
                 ) -> dict[str, dict[str, float | None]]:
    """Per part of the profile (``decode``: every row but the encode rows, ``encode``: the
    encode rows, ``calibrate.ENCODE_OPS``), d ln(figure) / d ln(that part's compute time) per
    figure of FIGURES: the difference quotient over ``1 + step`` and over ``1 / (1 + step)``,
    whichever is larger in magnitude (a plan on a regime boundary moves much more one way
    than the other). None: a figure missing or zero, or the plan infeasible there. Scaling
    both parts together leaves a WAA plan's encoder/decoder balance where it was; scaling one
    moves it, which is what a profile error of one kind of pass does."""
    from coordinator.bench.calibrate import scaled_profile

    if not step > 0:
        raise ValueError(f"the perturbation must be > 0, got {step}")
    base = predicted_under(plan, workload, profile)
    out: dict[str, dict[str, float | None]] = {}
    for part in ("decode", "encode"):
        quotients = []
        for f in (1.0 + step, 1.0 / (1.0 + step)):
            other = (f, 1.0) if part == "decode" else (1.0, f)
            moved = scaled_profile(profile, other[0], f"elasticity: {part} x {f:.3g}", other[1])
            quotients.append(_quotients(base, predicted_under(plan, workload, moved), f))
        out[part] = {k: max((q[k] for q in quotients if q[k] is not None), key=abs,
                            default=None) for k in FIGURES}
    return out


def _quotients(base: dict[str, Any] | None, moved: dict[str, Any] | None, factor: float
               ) -> dict[str, float | None]:
    from coordinator.bench.measure import comparable

    out: dict[str, float | None] = {}
    for key in FIGURES:
        a = comparable(base, key) if base else None
        b = comparable(moved, key) if moved else None
        ok = all(isinstance(v, int | float) and v > 0 and math.isfinite(v) for v in (a, b))
        out[key] = math.log(b / a) / math.log(factor) if ok else None  # type: ignore[operator]
    return out


def worst(elasticity: dict[str, dict[str, float | None]] | None, key: str) -> float | None:
    """The largest |elasticity| of ``key`` over the parts (None: not known)."""
    vals = [abs(v) for part in (elasticity or {}).values()
            if (v := part.get(key)) is not None]
    return max(vals) if vals else None


def well_conditioned(elasticity: dict[str, dict[str, float | None]] | None) -> bool | None:
    """Whether a 5% error in either part of the profile moves the plan's p99-length latency
    by at most ~10% (None: not known)."""
    e = worst(elasticity, "latency_p99len_s")
    return None if e is None else e <= WELL_CONDITIONED
