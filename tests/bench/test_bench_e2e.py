"""`exegpt bench` end to end on real processes: the null model, and a tiny real model with the
transformers reference. Machinery only: no assertion on any speed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.bench.measure import COMPARED
from coordinator.cli import main

ROW_KEYS = {"bound_s", "policy", "note", "runnable", "plan", "measured"}
MEASURED_KEYS = set(COMPARED) | {"requests", "ok", "failed", "makespan_s", "bound_met",
                                 "latency_max_s", "queue_p50_s", "throughput_makespan_seq_s",
                                 "p99len_requests", "mean_output_tokens", "repeats", "workers",
                                 "load_avg_1min", "latency_p99len_sem_s", "cpu_stretch"}


def check_results(out: Path, num_bounds: int, policies: list[str]) -> dict:
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"meta", "bounds", "rows", "reference", "headline"}
    assert len(results["bounds"]["bounds"]) == num_bounds
    assert results["bounds"]["bounds"][-1] is None  # no bound last
    assert [r["policy"] for r in results["rows"]] == policies * num_bounds
    ran = [r for r in results["rows"] if r["measured"]]
    assert ran, "no plan ran"
    for row in results["rows"]:
        assert ROW_KEYS <= set(row)
        if not row["measured"]:
            assert row["note"], "a row that did not run says why"
            continue
        assert MEASURED_KEYS <= set(row["measured"])
        assert row["measured"]["failed"] == 0
        assert set(row["error"]) == set(COMPARED)
        # static plans also predict the moment the p99-length latency measures (measure.py)
        assert set(row["predicted"]) - {"latency_to_p99_token_s"} == set(COMPARED)
        assert (out / row["records"]).is_file()
        assert isinstance(row["measured"]["bound_met"], bool)
        assert set(row["elasticity"]) == {"decode", "encode"}
        for w in row["measured"]["workers"]:  # every worker times its compute both ways
            assert w["busy_s"] > 0 and w["busy_cpu_s"] >= 0, w
    for png in ("throughput_vs_bound.png", "predicted_vs_measured.png", "timeline.png"):
        assert (out / png).stat().st_size > 1000
    md = (out / "results.md").read_text()
    assert md.count("## bound ") == num_bounds and "## headline" in md
    return results


def test_null_model_run_writes_well_formed_results(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = main(["bench", "--null-model", "--model", "tiny-llama", "--workload", "S",
                 "--bounds", "inf", "--requests", "6", "--policies",
                 "exegpt,static", "--out", str(out), "--no-progress",
                 "--startup-timeout", "60"])
    assert code == 0
    results = check_results(out, 1, ["exegpt", "static"])
    assert results["reference"] == {"skipped": "the null model has no weights"}
    assert results["meta"]["requests"] == 6 and results["meta"]["probes"] == 1
    # --reanalyse recomputes every figure from the recorded lifecycles, running nothing
    (out / "results.md").unlink()
    assert main(["bench", "--reanalyse", str(out)]) == 0
    again = check_results(out, 1, ["exegpt", "static"])
    assert again["meta"]["reanalysed"]
    for before, after in zip(results["rows"], again["rows"], strict=True):
        for key in ("throughput_seq_s", "latency_p99len_s", "cpu_stretch"):
            assert after["measured"][key] == before["measured"][key]
        assert after["elasticity"] == before["elasticity"]
    assert main(["bench", "--reanalyse", str(tmp_path / "nothing")]) == 2
    # a run whose plans the planner now predicts otherwise: --reanalyse refuses it, and
    # --repredict predicts the same plans again, keeping the run's own prediction beside
    tampered = json.loads((out / "results.json").read_text())
    row = next(r for r in tampered["rows"] if r["measured"])
    row["predicted"]["throughput_seq_s"] *= 2
    (out / "results.json").write_text(json.dumps(tampered))
    assert main(["bench", "--reanalyse", str(out)]) == 2
    assert main(["bench", "--reanalyse", str(out), "--repredict"]) == 0
    third = check_results(out, 1, ["exegpt", "static"])
    assert third["meta"]["repredicted"]
    redone = next(r for r in third["rows"] if r["measured"])
    assert redone["predicted_at_run"]["throughput_seq_s"] == row["predicted"]["throughput_seq_s"]
    assert redone["predicted"]["throughput_seq_s"] == pytest.approx(
        row["predicted"]["throughput_seq_s"] / 2)
    assert main(["bench", "--repredict", "--null-model", "--model", "tiny-llama"]) == 2


def test_bad_flags_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--null-model", "--model", "no-such", "--no-progress"]) == 2
    assert "--null-model needs --model PRESET" in capsys.readouterr().err
    assert main(["bench", "--bounds", "soon", "--no-progress"]) == 2


@pytest.mark.slow
def test_tiny_model_run_with_reference(tmp_path: Path) -> None:
    from tests.runner.tinymodels import make_llama

    model = make_llama(tmp_path / "tiny")
    out = tmp_path / "out"
    code = main(["bench", "--model", str(model), "--workload",
                 "in=uniform:4,16;out=uniform:2,8", "--profile", "analytic:a40",
                 "--bounds", "inf", "--requests", "4", "--policies", "exegpt", "--out",
                 str(out), "--no-progress", "--reference-batch", "2"])
    assert code == 0
    results = check_results(out, 1, ["exegpt"])
    ref = results["reference"]
    assert ref["batch"] == 2 and ref["measured"]["ok"] == 4
    assert ref["measured"]["finish_reasons"]["length"] == 4  # EOS ignored to the drawn length
