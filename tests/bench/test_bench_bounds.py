"""`--bounds auto`: the static baseline is run (here: a synthetic run) at each batch size and
the bounds are the 10/30/70th percentiles of its (maximum-length) latencies, plus no bound."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from coordinator.bench import bounds as B
from coordinator.bench import evaluate
from coordinator.bench.config import BenchConfig
from coordinator.bench.measure import RequestRecord
from coordinator.bench.meshrun import MeshRun
from coordinator.bench.progress import Progress


def fake_run_plan(plan: Any, requests: Any, target: Any, **kw: Any) -> MeshRun:
    """A static run whose probes (the longest requests) take exactly B seconds (batch B)."""
    assert plan.policy == "static"
    recs = []
    for i, r in enumerate(requests):
        start = float(i // plan.B_E)
        step = (plan.B_E - 0.5) / (r.output_len - 1) if r.probe else 0.01  # done at B s
        toks = tuple(start + 0.5 + k * step for k in range(r.output_len))
        recs.append(RequestRecord(len(r.prompt_ids), r.output_len, r.output_len, "length", None,
                                  0.0, start, start + 0.5, toks[0], toks[-1], toks))
    return MeshRun([recs], [{}], "fake", 0.0)


def test_auto_bounds_from_a_known_static_run(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evaluate, "run_plan", fake_run_plan)
    cfg = BenchConfig(model="tiny-llama", null_model=True, workload="S", workers=2,
                      requests=16, bound_batches=(1, 2, 4, 8), out=tmp_path, reference=False,
                      calibrate=False)
    ev = evaluate.Evaluation(cfg, Progress(enabled=False))
    got = ev.bounds()
    assert got["mode"] == "auto"
    assert [b["batch"] for b in got["baseline"]] == [1, 2, 4, 8]
    assert [b["latency_s"] for b in got["baseline"]] == pytest.approx([1, 2, 4, 8])
    assert got["bounds"][:3] == pytest.approx([1.3, 1.9, 4.4])
    assert got["bounds"][3] is None and got["calibration"] is None
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        f"baseline-static-B{b}.json" for b in (1, 2, 4, 8)]


def test_identical_plans_run_once_and_are_judged_per_bound(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake(plan: Any, requests: Any, target: Any, **kw: Any) -> MeshRun:
        calls.append(plan.B_E)
        return fake_run_plan(plan, requests, target)

    monkeypatch.setattr(evaluate, "run_plan", fake)
    cfg = BenchConfig(model="tiny-llama", null_model=True, workload="S", workers=2,
                      requests=8, bounds=(1.0, None), policies=("static",), out=tmp_path,
                      reference=False, profile="analytic:a40")
    ev = evaluate.Evaluation(cfg, Progress(enabled=False))
    tight = ev.row(0.5, 0, "static")  # ms-scale plans: B=512 meets 0.5 s on paper ...
    loose = ev.row(None, 1, "static")
    assert tight["plan"]["B_E"] == loose["plan"]["B_E"] == calls[0] and len(calls) == 1
    assert loose["reused_from"] == "bound0-static" and tight["reused_from"] is None
    assert loose["measured"]["throughput_seq_s"] == tight["measured"]["throughput_seq_s"]
    # ... but the (fake) run's probe took B_E seconds: judged against each bound
    assert tight["measured"]["bound_met"] is False and loose["measured"]["bound_met"] is True


def test_calibrated_auto_bounds_come_from_the_scaled_profile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evaluate, "run_plan", fake_run_plan)
    cfg = BenchConfig(model="tiny-llama", null_model=True, workload="S", workers=2,
                      requests=16, bound_batches=(1, 2), out=tmp_path, reference=False)
    ev = evaluate.Evaluation(cfg, Progress(enabled=False))
    raw = ev.setup.profile
    got = ev.bounds()
    fit = got["calibration"]
    factor, fixed = fit["compute_factor"], fit["stage_overhead_s"]
    assert factor > 1  # the fake runs are far slower than an A40
    assert [p["stages"] for p in fit["points"]] == [2, 2]  # static plans: one stage per worker
    assert ev.setup.profile.meta["calibration"]["factor"] == factor and raw is not ev.setup.profile
    assert ev.setup.profile.meta["mesh_overhead_s"]["stage"] == fixed
    pts = B.predicted_latencies(ev.setup.workload, ev.setup.profile, 2, B.batch_cap(2, 16))
    assert [p["batch"] for p in got["calibrated_static"]] == [b for b, _ in pts] == [1, 2, 3, 4]
    assert got["bounds"][:3] == pytest.approx(B.percentile_bounds([x for _, x in pts])[:3])
    # the fit reproduces the measured time per token of both baseline runs (2 points, 2
    # unknowns, or o = 0 and the median ratio when the fake's numbers make o negative)
    if fit["method"] == "least squares":
        for p in fit["points"]:
            assert p["fitted_tpot_s"] == pytest.approx(p["tpot_s"], rel=1e-6)
    assert pts[0][1] > factor * B.predicted_latencies(ev.setup.workload, raw, 2, 4)[0][1] * 0.999
