"""`exegpt bench adapt`'s machinery: the null profile describes the null costs; a tiny run of
the arms produces well-formed numbers (no speed is asserted: the machine is shared)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.commands._adapt_bench import ArmRun, BenchConfig
from coordinator.commands._adapt_bench_report import markdown, phase, steady_after, summarize
from coordinator.commands._null_profile import NullCosts, null_profile_dict
from coordinator.commands.bench_adapt import bench
from coordinator.planner.costs import Costs
from coordinator.planner.layout import Stage
from coordinator.planner.profile import Profile


def test_null_profile_predicts_the_null_stage_costs() -> None:
    costs = NullCosts(25.0, 5.0, 1.5)
    c = Costs(Profile.from_json(json.dumps(null_profile_dict(costs))))
    first, last = Stage(1, (0, 0), (0, 15), True, False), Stage(1, (0, 0), (15, 30), False, True)
    for stage in (first, last):
        for batch, ctx in ((1, 10), (8, 300), (200, 4000)):  # the null sleep ignores both
            assert c.decode_stage(stage, float(batch), float(ctx)) == pytest.approx(0.025)
        for batch, length in ((1, 1), (8, 64), (40, 100)):
            assert c.encode_stage(stage, batch, length, length) == pytest.approx(
                (5.0 + 1.5 * batch * length) / 1000)
    with pytest.raises(ValueError, match="split evenly"):
        null_profile_dict(costs, stages=7)
    with pytest.raises(ValueError, match="decode_ms"):
        NullCosts(0.0)


def _fake(arm: str, switch: bool) -> ArmRun:
    """40 s at 10 req/s (latency 1 s), shift at 20 s; after it 20 req/s."""
    run = ArmRun(arm, t0=1000.0, t_shift=1020.0, t_end=1040.0, sent_before_shift=200)
    for i in range(600):
        t = 1000.0 + i * 0.1 if i < 200 else 1020.0 + (i - 200) * 0.05
        run.records.append({"id": str(i), "law": "old" if i < 200 else "new", "in": 8,
                            "out": 4, "t_arrival": t, "t_encode": t, "t_finish": t + 1.0,
                            "t_done": t + 1.0})
    if switch:
        run.switches = [{"t": 1022.0, "switch_s": 0.5, "detect_arrival": 260, "detect_s": 1.0,
                         "replan_s": 0.4, "search_s": 0.3, "pause_s": 0.0, "reason": "x",
                         "old": {"B_E": 4, "N_D": 2}, "new": {"B_E": 8, "N_D": 4},
                         "meets_bound": True,
                         "relayout": {"stages": [[0, 15], [15, 30]], "streams": 2,
                                      "drain_s": 2.0, "migrated_requests": 3,
                                      "rerun_tokens": 40, "reload_s": 0.1, "pause_s": 2.2}}]
    return run


def test_summary_phases_and_switch_figures() -> None:
    cfg = BenchConfig(before_s=20.0, after_s=20.0, bound_s=1.5)
    runs = {"adapt": _fake("adapt", True), "keep": _fake("keep", False)}
    plan = {"B_E": 4, "N_D": 2, "throughput_seq_s": 10.0, "latency_p99len_s": 1.2}
    out = summarize(runs, cfg, {"old": plan, "old_on_new_law": {
        "throughput_seq_s": 12.0, "latency_p99len_s": 3.0}})
    adapt = out["arms"]["adapt"]
    assert adapt["before"]["seq_s"] == pytest.approx(10.0, rel=0.1)
    assert adapt["after"]["seq_s"] == pytest.approx(20.0, rel=0.1)
    assert adapt["during"]["span_s"] == out["arms"]["keep"]["during"]["span_s"] == 2.0
    assert adapt["after"]["attainment"] == 1.0 and adapt["after"]["p99_latency_s"] == 1.0
    sw = adapt["switches"][0]
    assert (sw["at_s"], sw["fired_at_s"], sw["detect_requests_after_shift"]) == (2.0, 1.5, 60)
    assert phase(runs["keep"], 1030.0, 1040.0, 0.5)["attainment"] == 0.0
    assert steady_after(adapt["series"], 2.0, smooth_s=2.0) == 0.0  # flat after the switch
    assert steady_after({"t": [0.0, 1.0], "seq_s": [1.0, 1.0]}, 0.0) is None  # too short
    text = markdown(out)
    assert "| adapt | after |" in text and "N_D 2->4" in text
    assert "RE-LAYOUT to stages [[0, 15], [15, 30]]" in text and "3 requests migrated" in text
    assert "plan old_on_new_law: predicted 12.0 seq/s" in text


def test_tiny_bench_run_is_well_formed(tmp_path: Path) -> None:
    cfg = BenchConfig(NullCosts(2.0, 0.5, 0.05), bound_s=0.5, before_s=2.0, after_s=3.0,
                      concurrency=32, adapt_options="window=32,min_samples=16,min_dwell_s=1,"
                      "min_dwell_requests=8")
    summary = bench(cfg, ["adapt", "restart"], tmp_path, say=lambda _: None)
    for name in ("bench-adapt.json", "bench-adapt.md", "bench-adapt.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "bench-adapt.json").read_text()) == json.loads(
        json.dumps(summary))
    for name, arm in summary["arms"].items():
        assert arm["requests"] > 0 and arm["before"]["seq_s"] > 0, name
        assert len(arm["series"]["t"]) == len(arm["series"]["seq_s"]) > 0
    restart = summary["arms"]["restart"]["restart"]
    assert restart["gap_s"] == pytest.approx(restart["drain_s"] + restart["stop_start_s"],
                                             abs=0.02)
    # the old plan is served with the default uneven split: the adapt arm's re-plan (the
    # planner's even split) re-lays the stages out live
    assert summary["plans"]["old"]["stages"] == [[0, 10], [10, 30]]
    assert summary["plans"]["new"]["stages"] == [[0, 15], [15, 30]]
