"""docs/paper-reproduction.md is generated, not typed: it must equal a fresh regeneration,
and the paper's pattern (WAA at the tightest bound, RRA with no bound) must hold."""

from __future__ import annotations

import math
from pathlib import Path

from coordinator.planner import reproduce
from coordinator.planner.sweep import winners

DOC = Path(__file__).resolve().parents[2] / "docs" / "paper-reproduction.md"


def test_doc_is_current_and_pattern_holds() -> None:
    bounds, points = reproduce.reproduction_points()
    assert DOC.read_text() == reproduce.render((bounds, points)), (
        "docs/paper-reproduction.md is stale: run "
        "`python -m coordinator.planner.reproduce > docs/paper-reproduction.md`")
    win = winners(points)
    assert win[bounds[0]].startswith("waa")
    # with no bound RRA wins or ties (within 1%: what the cost model cannot resolve); since
    # the RRA encode round pays its pipeline fill the two are that close here
    best_of = {pol: max((p.best[1].throughput_seq_s for p in points
                         if p.bound == math.inf and p.best and p.policy.startswith(pol)),
                        default=0.0) for pol in ("rra", "waa")}
    assert win[math.inf] == "rra" or best_of["rra"] >= 0.99 * best_of["waa"]
    static = {p.bound: p.best[1].throughput_seq_s for p in points if p.policy == "static"}
    best = {b: max(p.best[1].throughput_seq_s for p in points
                   if p.bound == b and p.best and p.policy in ("rra", "waa-c", "waa-m"))
            for b in bounds}
    assert all(best[b] > static[b] for b in bounds)
