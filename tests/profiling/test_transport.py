"""Communication rows measured between real processes (ZeroMQ pair; gloo TP group)."""

from __future__ import annotations

import json

import pytest

from common.engine.dist import run_spmd
from common.models.config import ModelConfig
from common.profiling import Grid, measure_profile
from coordinator.planner.profile import Profile


def test_kv_handoff_and_stage_send_between_two_processes() -> None:
    cfg = ModelConfig.preset("tiny-llama")
    grid = Grid.quick()
    payload = {"model": cfg.to_dict(), "grid": grid.to_json(), "dtype": "bfloat16",
               "device": "cpu", "num_threads": 1, "progress": None}
    sender, receiver = run_spmd("common.profiling.measure:spmd_transport", payload, 2)
    assert receiver == []
    by_op: dict[str, list[dict]] = {}
    for row in sender:
        by_op.setdefault(row["op"], []).append(row)
    assert set(by_op) == {"stage_send", "kv_handoff"}
    for op, rows in by_op.items():
        sizes = [r["bytes"] for r in rows]
        assert len(sizes) == len(grid.transport_bytes), op
        # sizes follow the grid, rounded to whole tokens of the model's shapes
        for got, want in zip(sizes, grid.transport_bytes, strict=True):
            assert want / 2 <= got <= want, (op, got, want)
        assert all(r["tp"] == 1 and r["time_s"] >= 0 for r in rows)
        # 64 KiB through encode, ZeroMQ, strict decode and a copy costs something
        assert rows[-1]["time_s"] > 1e-6, op


@pytest.mark.slow
def test_tp2_profile_has_allreduce_and_sharded_layers() -> None:
    cfg = ModelConfig.preset("tiny-llama")
    data = measure_profile(cfg, (1, 2), "bfloat16", quick=True, progress=False)
    profile = Profile.from_json(json.dumps(data))
    assert profile.tp_sizes == [1, 2]
    allreduce = sorted((r["bytes"], r["time_s"]) for r in profile.rows
                       if r["op"] == "allreduce")
    assert [b for b, _ in allreduce] == list(Grid.quick().allreduce_bytes)
    assert all(t > 0 for _, t in allreduce)
    assert profile.op("allreduce", 1, 4096) == 0.0
    assert profile.attn("dec", 2, 4, 32) > 0 and profile.rest("dec", 2, 4) > 0
    assert {r["op"] for r in profile.rows} >= {"stage_send", "kv_handoff"}
