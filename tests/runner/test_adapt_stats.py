"""After a live plan switch, stats compare with the new plan (metrics.set_plan) and report the
switch; the pipeline driver reports the live knobs; `exegpt serve --adapt` flags."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from coordinator.commands import serve
from coordinator.metrics import Metrics
from coordinator.planner.analytic import parse_profile_arg
from coordinator.planner.planning import make_plan
from coordinator.planner.workload import parse_workload
from tests.runner.test_metrics import done, plan_dict

PROFILE = "analytic:a40:smollm2-135m"
SHORT = "name=short;in=normal:64,32,128;out=normal:8,3,20"


def test_set_plan_compares_requests_after_the_switch_with_the_new_plan() -> None:
    m = Metrics(plan=plan_dict(latency_p99len_s=2.0))
    m.on_finish(done("old", 0.0, 0.5, 1.0, 0.5, 11))  # latency 6.0 s: over the old 3 s bound
    before = m.snapshot()
    assert before["vs_plan"]["latency_bound"]["met"] is False
    assert before["plan_switches"] == [] and before["vs_plan"]["requests"] == 1
    new = {**plan_dict(latency_p99len_s=1.5), "B_E": 2, "latency_bound_s": 3.0}
    switch = {"t": 10.0, "reason": "mean_output +40%", "old": {"B_E": 4}, "new": {"B_E": 2},
              "replan_s": 0.3, "pause_s": 0.0}
    m.set_plan(new, switch)
    m.on_finish(done("new", 10.5, 10.6, 11.0, 0.1, 11))  # arrived after: 1.4 s from encode
    after = m.snapshot()
    assert after["plan"]["B_E"] == 2 and after["plan_switches"] == [switch]
    vs = after["vs_plan"]
    assert vs["since"] == 10.0 and vs["requests"] == 1  # the old request is not compared
    assert vs["latency_bound"]["met"] is True
    row = next(r for r in vs["rows"] if r["predicted"] == 1.5)
    assert row["measured"] == pytest.approx(1.4)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    return parser


def test_serve_passes_adapt_flags_to_the_coordinator(tmp_path: Path) -> None:
    plan = make_plan(parse_workload(SHORT), parse_profile_arg(PROFILE), 2, 0.3, policy="rra")
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    base = ["serve", "--null-model", "--plan", str(path), "--runs-dir", str(tmp_path)]
    args = _parser().parse_args([*base, "--adapt", "--profile", PROFILE, "--adapt-options",
                                 "window=64", "--decode-cost-ms", "25"])
    spec = serve.spec_from_args(args)
    argv = spec.coordinator_child(3).argv
    assert spec.decode_cost_ms == 25.0 and spec.plan_file == str(path.resolve())
    tail = ("--plan", str(path.resolve()), "--profile", PROFILE, "--adapt",
            "--adapt-options", "window=64")
    assert tuple(argv[-len(tail):]) == tail
    for bad, why in ((["--adapt"], "needs --profile"),
                     (["--adapt", "--profile", PROFILE, "--adapt-options", "x=1"], "x=1"),
                     (["--adapt", "--profile", str(tmp_path / "nope.json")], "no such file")):
        with pytest.raises(ValueError, match=why):
            serve.spec_from_args(_parser().parse_args([*base, *bad]))
    with pytest.raises(ValueError, match="need a plan"):
        serve.spec_from_args(_parser().parse_args(["serve", "--null-model", "--adapt"]))


def test_auto_plan_is_written_into_the_run_directory(tmp_path: Path) -> None:
    plan = make_plan(parse_workload(SHORT), parse_profile_arg(PROFILE), 2, 0.3, policy="rra")
    args = _parser().parse_args(["serve", "--null-model", "--runs-dir", str(tmp_path)])
    args.plan = None
    written = Path(serve.plan_path(args, plan, "run1"))
    assert written == (tmp_path / "run1" / "plan.json").resolve()
    assert written.read_text() == plan.to_json()
