"""XScheduler: B&B against exhaustive search, infeasible bounds, the Plan value, the CLI."""

from __future__ import annotations

import json
import math

import pytest

from coordinator.cli import main
from coordinator.planner.bnb import Axis, branch_and_bound, exhaustive
from coordinator.planner.candidate import WorkloadStats
from coordinator.planner.plan import Plan
from coordinator.planner.planning import make_plan
from coordinator.planner.scheduler import InfeasibleBound, search
from coordinator.planner.workload import parse_workload, preset


def test_bnb_on_a_monotone_function_equals_exhaustive() -> None:
    axes = [Axis(40, 1, 1), Axis(30, -1, -1), Axis(3, -1, -1)]

    def ev(x: tuple[int, ...]) -> tuple[float, float]:
        a, b, c = x[0] + 1, 30 - x[1], 3 - x[2]
        return math.log(a) + 0.5 * b + 0.1 * c, (a * b + 3 * c) / 200.0

    fast, slow = branch_and_bound(axes, ev, eps_t=0.0), exhaustive(axes, ev)
    assert fast.best_f == pytest.approx(slow.best_f)
    assert fast.evaluated < slow.evaluated / 4


@pytest.mark.parametrize("task,bound", [("S", 4.0),
                                        pytest.param("C1", 9.0, marks=pytest.mark.slow),
                                        pytest.param("G", 25.0, marks=pytest.mark.slow)])
def test_bnb_matches_exhaustive_on_the_planner_space(task: str, bound: float,
                                                     a40_t5_costs) -> None:  # noqa: ANN001
    """T5-11B on 2 A40s: a small space (tp 1/2, one or two stages); within eps_T."""
    stats = WorkloadStats(preset(task))
    pols = ("rra", "waa-c", "waa-m", "static", "continuous")
    fast = search(stats, a40_t5_costs, 2, bound, policies=pols, tp_sizes=[1, 2])
    slow = search(stats, a40_t5_costs, 2, bound, policies=pols, tp_sizes=[1, 2],
                  use_exhaustive=True)
    assert slow.best is not None and fast.best is not None
    assert fast.best[1].throughput_seq_s >= slow.best[1].throughput_seq_s * (1 - 0.005)
    assert fast.best[1].latency("b") <= bound
    assert fast.evaluated < slow.evaluated


def test_infeasible_bound_names_the_tightest_latency(a40_opt13b_costs) -> None:  # noqa: ANN001
    with pytest.raises(InfeasibleBound, match=r"tightest reachable latency is [0-9.]+ s"):
        make_plan(preset("S"), a40_opt13b_costs.profile, 4, 0.05)


def test_plan_round_trip_and_groups(a40_opt13b_costs) -> None:  # noqa: ANN001
    plan = make_plan(preset("S"), a40_opt13b_costs.profile, 4, 6.0)
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert sum(g.count for g in plan.worker_groups) == 4
    assert plan.predicted["latency_p99len_s"] <= 6.0
    roles = {g.role for g in plan.worker_groups}
    assert roles in ({"pipeline"}, {"encoder", "decoder"})
    for role in roles:  # each role's stages cover every decoder layer once, in order
        ranges = [g.layer_range for g in plan.groups(role)]
        assert ranges[0][0] == 0 and ranges[-1][1] == 40
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    lo, hi = plan.adjust["decode_batch"]
    assert lo <= plan.B_D <= hi
    with pytest.raises(ValueError, match="policy"):
        Plan.from_dict({**plan.to_dict(), "policy": "fifo"})


def test_cli_plan_json_and_table(tmp_path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "plan.json"
    rc = main(["plan", "--profile", "analytic:a40:opt-13b", "--workload", "S",
               "--latency-bound", "6", "--gpus", "4", "--json", "--out", str(out)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert Plan.from_json(out.read_text()).predicted["latency_p99len_s"] <= 6
    rc = main(["plan", "--profile", "analytic:a40:opt-13b", "--workload", "S",
               "--latency-bound", "6", "--gpus", "4"])
    table = capsys.readouterr().out
    assert rc == 0 and "elasticity        decode cost: latency +" in table
    assert "ill-conditioned" not in table
    rc = main(["plan", "--profile", "analytic:a40:opt-13b", "--workload", "S",
               "--latency-bound", "0.01", "--gpus", "4"])
    assert rc == 2 and "tightest reachable latency" in capsys.readouterr().err
    rc = main(["plan", "--profile", "analytic:a40:opt-13b", "--model", "gpt3-39b",
               "--workload", "S", "--latency-bound", "6", "--gpus", "4"])
    assert rc == 1 and "profile is for model" in capsys.readouterr().err


def test_cli_sweep_and_timeline_write_pngs(tmp_path, capsys) -> None:  # noqa: ANN001
    png, tl = tmp_path / "sweep.png", tmp_path / "tl.png"
    rc = main(["plan", "--profile", "analytic:a100:opt-13b", "--workload", "C1", "--gpus", "2",
               "--sweep", "--bounds", "5,inf", "--policy", "all", "--sweep-png", str(png)])
    assert rc == 0 and png.stat().st_size > 10_000
    table = capsys.readouterr().out
    assert "| inf | rra |" in table and "| 5.00 | static |" in table
    rc = main(["plan", "--profile", "analytic:a100:opt-13b", "--workload", "C1", "--gpus", "2",
               "--latency-bound", "inf", "--timeline", str(tl)])
    assert rc == 0 and tl.stat().st_size > 10_000


def test_workload_with_rate_plans_saturated_capacity(a40_opt13b_costs) -> None:  # noqa: ANN001
    wl = parse_workload("preset=S;rate=3")
    plan = make_plan(wl, a40_opt13b_costs.profile, 4, 6.0)
    assert plan.workload == "preset=S;rate=3"
