"""The bench's concurrency cap: K // 2 requests in flight by default (every plan it runs is one
K requests fill twice), 0 for none; applied to every policy, bound and the static sweeps."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from coordinator.bench import bounds as B
from coordinator.bench import evaluate
from coordinator.bench.config import BenchConfig
from coordinator.bench.measure import RequestRecord
from coordinator.bench.meshrun import MeshRun
from coordinator.bench.plans import choose_plan
from coordinator.bench.progress import Progress
from coordinator.commands.bench_eval import add_arguments, config_from_args
from coordinator.planner.inflight import plan_in_flight


def _config(*flags: str) -> BenchConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(["--null-model", "--model", "tiny-llama",
                                               *flags]))


def test_flag_default_is_half_of_k_and_zero_lifts_it() -> None:
    assert _config("--requests", "96").in_flight_cap == 48
    assert _config("--requests", "7").in_flight_cap == 3
    assert _config("--quick").in_flight_cap == 6
    assert _config("--requests", "96", "--max-in-flight", "0").in_flight_cap is None
    assert _config("--requests", "96", "--max-in-flight", "200").in_flight_cap == 200
    with pytest.raises(ValueError, match="--max-in-flight must be >= 0"):
        _config("--max-in-flight", "-1")


def test_static_sweeps_stop_at_the_cap() -> None:
    """The default cap (K // 2) and the fill rule (K / (2 x streams)) give the same batch; a
    smaller cap stops the sweep at the batch whose B x streams it allows."""
    for k in range(2, 130):
        for streams in (1, 2, 3, 4):
            assert B.batch_cap(streams, k, k // 2) == B.batch_cap(streams, k)
    assert B.batch_cap(2, 96) == 24 and B.batch_cap(2, 96, 20) == 10
    assert B.batch_cap(2, 96, 1) == 1  # never below one request per stream
    assert B.measured_batches(2, 96) == [1, 2, 4, 8, 16]
    assert B.measured_batches(2, 96, (), 12) == [1, 2, 4]
    assert B.measured_batches(2, 96, (32,), 12) == [32]  # asked for: run as asked


def _fake_run(plan: Any, requests: Any, target: Any, **kw: Any) -> MeshRun:
    recs = [RequestRecord(len(r.prompt_ids), r.output_len, r.output_len, "length", None, 0.0,
                          0.0, 0.1, 0.2, 1.0, tuple(0.2 + 0.8 * k / max(r.output_len - 1, 1)
                                                    for k in range(r.output_len)))
            for r in requests]
    return MeshRun([recs], [{}], "fake", 0.0)


@pytest.mark.parametrize("cap", [None, 0, 5])
def test_every_policy_is_planned_under_the_cap(cap: int | None, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """K = 16 on 2 analytic A40s with no bound: uncapped, every policy's best plan holds far
    more than K requests (a fill and drain); under the cap (default 8) each fills, and the
    fills flag agrees with the planner's own count."""
    monkeypatch.setattr(evaluate, "run_plan", _fake_run)
    cfg = BenchConfig(model="tiny-llama", null_model=True, workload="S", workers=2,
                      requests=16, bounds=(None,), policies=("exegpt", "static", "continuous"),
                      out=tmp_path, reference=False, profile="analytic:a40",
                      max_in_flight=cap)
    ev = evaluate.Evaluation(cfg, Progress(enabled=False))
    limit = {None: 8, 0: None, 5: 5}[cap]
    assert cfg.in_flight_cap == limit and ev.meta(0.0)["max_in_flight"] == limit
    for policy in cfg.policies:
        row = ev.row(None, 0, policy)
        assert row["plan"] is not None, row["note"]
        held = row["in_flight"]
        assert row["fills"] == (2 * held <= 16)
        if limit is None:
            assert held > 16 and "fill and drain" in row["note"]
        else:
            assert held <= limit and row["fills"] and row["measured"] is not None


def test_waa_is_planned_under_the_cap_or_says_why(tmp_path: Path) -> None:
    """A WAA decoder holds B_E x E[S] requests (E[S] = 32 on task S), plus the batches on their
    way: 16 in flight is below any WAA plan, 40 is not. The bench counts what the planner
    counts."""
    cfg = BenchConfig(model="tiny-llama", null_model=True, workload="S", workers=2,
                      requests=80, out=tmp_path, reference=False, profile="analytic:a40")
    ev = evaluate.Evaluation(cfg, Progress(enabled=False))
    args = (ev.setup.workload, ev.setup.profile, 2, None, True)
    none = choose_plan("waa", *args, 16)
    assert none.plan is None and "at most 16 requests in flight" in none.note
    plan = choose_plan("waa", *args, 40).plan
    assert plan is not None and plan.policy.startswith("waa")
    held = evaluate.in_flight(plan)
    assert held == plan_in_flight(plan) == plan.predicted["requests_in_flight"]
    assert plan.B_E * 32 <= held <= 40
