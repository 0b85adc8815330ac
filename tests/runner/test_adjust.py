"""Dynamic B_E adjustment rule and plan -> launch mapping (pure, no processes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.adjust import Band, BatchSizer
from coordinator.plan_launch import plan_fields
from coordinator.planner.plan import Plan, WorkerGroup


def test_without_bands_the_batch_is_b_e() -> None:
    sizer = BatchSizer(4, cap=100)
    assert sizer.size([10] * 10, running=50).size == 4
    assert sizer.size([10] * 3, running=0).size == 3  # fewer queued than B_E: not an adjustment
    assert sizer.size([10] * 3, running=0).reason == "plan"


def test_token_sum_band_moves_the_cut() -> None:
    sizer = BatchSizer(4, cap=100, token_sum=Band(30, 50))
    over = sizer.size([20, 20, 20, 20, 1], running=0)
    assert over.size == 2 and "over" in over.reason  # 40 <= 50 < 60
    under = sizer.size([5, 5, 5, 5, 5, 5, 5, 5], running=0)
    assert under.size == 6 and "under" in under.reason  # grows to reach 30
    assert sizer.size([10, 10, 10, 10, 10], running=0) == sizer.size([10] * 4, running=0)
    assert sizer.size([10] * 8, running=0).reason == "plan"


def test_decode_batch_band_scales_b_e() -> None:
    sizer = BatchSizer(8, cap=100, decode_batch=Band(10, 20))
    assert sizer.size([1] * 50, running=40).size == 4  # 8 * 20 / 40
    assert sizer.size([1] * 50, running=5).size == 16  # 8 * 10 / 5, capped at 2 x B_E
    assert sizer.size([1] * 50, running=15).size == 8


def test_bad_band_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="LO,HI"):
        Band.parse("3")
    with pytest.raises(ValueError, match="lo <= hi"):
        Band.parse("5,3")


def _plan(policy: str, groups: list[WorkerGroup]) -> Plan:
    return Plan(policy=policy, model={"num_layers": 4}, workload="S", latency_bound_s=1.0,
                sla="b", num_workers=sum(g.count for g in groups), worker_groups=tuple(groups),
                B_E=3, B_D=6.0, N_D=None, B_m=1, microbatches=1,
                adjust={"token_sum": [10.0, 50.0], "decode_batch": [2.0, 9.5]}, predicted={},
                search={}, profile_meta={})


def test_plan_fields_follow_the_plan() -> None:
    plan = _plan("waa-c", [WorkerGroup("encoder", 2, 2, (0, 4)),
                           WorkerGroup("decoder", 1, 1, (0, 4))])
    fields = plan_fields(plan, null_model=False, decoder_capacity=64)
    assert [(g.role, g.count, g.tp_size) for g in fields["groups"]] == [("encoder", 1, 2),
                                                                       ("decoder", 1, 1)]
    assert fields["encode_batch"] == 3
    assert fields["groups"][1].capacity == 10  # ceil(9.5): the decode band caps the batch
    assert fields["adjust_token_sum"] == "10,50" and fields["adjust_decode_batch"] == "2,9.5"


def test_unrunnable_plans_are_refused() -> None:
    rra = _plan("rra", [WorkerGroup("pipeline", 1, 1, (0, 2)),
                        WorkerGroup("pipeline", 1, 1, (2, 4))])
    fields = plan_fields(rra, null_model=False, decoder_capacity=64)  # stage workers run it
    assert [(g.role, g.layer_range) for g in fields["groups"]] == [("pipeline", (0, 2)),
                                                                  ("pipeline", (2, 4))]
    staged = _plan("waa-m", [WorkerGroup("encoder", 1, 1, (0, 4)),
                           WorkerGroup("decoder", 1, 1, (0, 2)),
                           WorkerGroup("decoder", 1, 1, (2, 4))])
    fields = plan_fields(staged, null_model=False, decoder_capacity=64)  # staged WAA runs it
    assert [(g.role, g.layer_range) for g in fields["groups"]] == [
        ("encoder", (0, 4)), ("decoder", (0, 2)), ("decoder", (2, 4))]
    assert fields["streams"] == 1 and fields["groups"][1].capacity == 10  # B_m; the band
    assert len(plan_fields(staged, null_model=True, decoder_capacity=64)["groups"]) == 3
    tp2 = _plan("waa-m", [WorkerGroup("encoder", 2, 2, (0, 4)),
                          WorkerGroup("decoder", 1, 1, (0, 2)),
                          WorkerGroup("decoder", 1, 1, (2, 4))])
    assert [g.tp_size for g in plan_fields(tp2, null_model=False,  # a stage's TP group
                                           decoder_capacity=64)["groups"]] == [2, 1, 1]
    gap = _plan("waa-m", [WorkerGroup("encoder", 1, 1, (0, 4)),
                          WorkerGroup("decoder", 1, 1, (0, 2)),
                          WorkerGroup("decoder", 1, 1, (3, 4))])
    with pytest.raises(ValueError, match="contiguous"):
        plan_fields(gap, null_model=False, decoder_capacity=64)


def test_coordinator_stays_torch_free(tmp_path: Path) -> None:
    """Admission with a real tokenizer and the plan machinery must not import torch."""
    from tests.runner.tinymodels import save_word_tokenizer

    save_word_tokenizer(tmp_path, 16)
    script = (f"import sys\nfrom coordinator.server import load_tokenizer\n"
              f"import coordinator.adjust, coordinator.plan_launch, coordinator.admission\n"
              f"tok = load_tokenizer({str(tmp_path)!r})\nassert tok.encode('w3 w5') == [3, 5]\n"
              f"print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parents[2])
    assert out.stdout.strip() == "False", out.stderr
