"""Does a profile promise that throughput grows with the batch? (the B&B fast path's premise)

Branch and bound (bnb.py) is fastest when f is monotone along B_E: a box is then bounded by
its largest-B_E corner, and a feasible corner is the box's best point. Throughput is B_E /
(time of B_E sequences); it grows with B_E when that time grows *less* than proportionally,
i.e. when every cost the simulator adds up has a per-unit cost (time / batch, / tokens, /
bytes) that never rises with the size. Sums, maxima and fixed overheads of such costs keep the
property, so one check of the profile's tables settles it for every policy's B_E axis.

Roofline (analytic) profiles pass: fixed memory time plus linear compute. Measured CPU
profiles need not: SmolLM2-135M on this machine has a decode layer whose non-attention part
costs 4.0 ms at 64 tokens and 13.7 ms at 128 (3.4x for 2x: the working set leaves the cache),
and above the measured grid a table extrapolates with its steepest slope, so throughput peaks
at B_E ~ 32 and falls beyond (docs/planner.md, Known limits). When the check fails, the
scheduler searches with bounds that do not need f monotone (bnb.py's ratio and free axes).

The check reads each table at its measured sizes plus twice the largest (the extrapolated
tail is affine, so one point past the grid decides it). Between two measured sizes a table is
linear, and time / size along a line through two points with non-increasing time / size is
non-increasing too (its intercept is >= 0), so the measured sizes suffice. Attention tables
are checked along the batch at each measured context (bilinear: a blend of such columns).
"""

from __future__ import annotations

from collections.abc import Callable

from coordinator.planner.profile import ATTN_OPS, BYTE_OPS, TOKEN_OPS, Profile

_REL = 1e-9  # rounding slack


def _falls(sizes: list[float], cost: Callable[[float], float]) -> bool:
    """cost(x) / x never rises over ``sizes`` and twice the largest."""
    xs = sorted({x for x in sizes if x > 0})
    if not xs:
        return True
    xs.append(2.0 * xs[-1])
    per_unit = [float(cost(x)) / x for x in xs]
    return all(b <= a * (1.0 + _REL) for a, b in zip(per_unit, per_unit[1:], strict=False))


def _query(profile: Profile, op: str, tp: int) -> Callable[[float], float]:
    if op in ("enc_layer_rest", "dec_layer_rest"):
        phase = op.split("_", 1)[0]
        return lambda x: profile.rest(phase, tp, x)
    return lambda x: profile.op(op, tp, x)


def per_unit_costs_fall(profile: Profile) -> bool:
    """True when every table's time per unit of size never rises with the size (see module
    docstring): throughput then grows with B_E. Memoised on the profile."""
    cached = profile.__dict__.get("_per_unit_costs_fall")
    if cached is not None:
        return bool(cached)
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in profile.rows:
        groups.setdefault((row["op"], int(row["tp"])), []).append(row)
    ok = True
    for (op, tp), rows in groups.items():
        if op in ATTN_OPS:
            phase = op.split("_", 1)[0]
            batches = [float(r["batch"]) for r in rows]
            for s in sorted({float(r["seq_len"]) for r in rows}):
                ok = ok and _falls(batches, lambda b, s=s, tp=tp, ph=phase:
                                   profile.attn(ph, tp, b, s))
        elif op in TOKEN_OPS or op in BYTE_OPS:
            if op == "allreduce" and tp == 1:
                continue  # free on one worker
            col = "bytes" if op in BYTE_OPS else "tokens"
            ok = ok and _falls([float(r[col]) for r in rows], _query(profile, op, tp))
        if not ok:
            break
    profile.__dict__["_per_unit_costs_fall"] = ok
    return ok
