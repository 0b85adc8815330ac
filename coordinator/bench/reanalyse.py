"""`exegpt bench --reanalyse DIR`: recompute an evaluation's figures from what it recorded.

Every mesh run's request lifecycles are kept in DIR/runs/ and every plan with them, so the
measured figures, errors, elasticities, tables and plots can be recomputed without running
the mesh again (after a change to how they are computed, or to read an old run with today's
report). The profile is the one the run planned with: the uncalibrated profile it names,
scaled by the calibration it recorded. Every re-simulated plan must reproduce the prediction
the run recorded, or the reanalysis stops: a profile re-measured since would explain nothing
about that run.

``--repredict`` asks the other question: how far today's planner is from what those runs
measured. The calibration is fitted again from the recorded baseline runs (their encode
passes and TPOTs, predicted by today's planner, ``calibrate.fit_pass_model``), every recorded plan
is predicted again on the profile so calibrated, and the run's own prediction is kept beside
it (``predicted_at_run``). The plans are the ones the run chose: a planner changed since may
choose others for the same bounds, which only a new run shows (``meta.repredicted`` says so).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from coordinator.bench.measure import RequestRecord, measure, median_of, relative_errors
from coordinator.bench.sensitivity import elasticities, predicted_under
from coordinator.bench.stretch import (
    calibration_stretch,
    errors_at_run_load,
    run_stretch,
    worker_busy,
)

CHECKED = ("throughput_seq_s", "latency_p99len_s", "tpot_s")
REL_TOL = 1e-6


def _profile(results: dict[str, Any]) -> Any:
    """The (calibrated) profile the run planned with."""
    from coordinator.bench.calibrate import PassFit, calibrated_profile
    from coordinator.bench.setup import load_profile, resolve_target
    from coordinator.planner.profile import Profile

    meta = results["meta"]
    base = str(meta["profile"]).split(" x ")[0]
    if Path(base).is_file():
        profile = Profile.load(base, dtype=meta["dtype"])
    else:  # analytic (the null model's default, or --profile analytic:...): rebuilt as it was
        cfg = config(results)
        if cfg.profile is None and not cfg.null_model:
            raise ValueError(f"the profile the run used, {base!r}, is gone")
        _, model_cfg, _ = resolve_target(cfg)
        profile = load_profile(cfg, model_cfg, say=lambda *_: None)[0]
    fit = (results.get("bounds") or {}).get("calibration")
    if fit:
        profile = calibrated_profile(profile, PassFit(
            fit["compute_factor"], fit["stage_overhead_s"], fit["method"], [],
            fit.get("encode_factor")), "static baseline runs, tpot")
    return profile


def config(results: dict[str, Any]) -> Any:
    """The BenchConfig the run was made with."""
    from coordinator.bench.config import BenchConfig

    raw = dict(results["meta"]["config"])
    for key in ("policies", "bound_batches"):
        raw[key] = tuple(raw[key])
    if isinstance(raw["bounds"], list):
        raw["bounds"] = tuple(raw["bounds"])
    raw["out"] = Path(raw["out"])
    return BenchConfig(**raw)


def _baseline_runs(out: Path, bounds: dict[str, Any]
                   ) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(the bounds' entry, the saved run) of each baseline static run DIR/runs/ still holds."""
    for base in bounds.get("baseline") or []:
        run = out / "runs" / f"baseline-static-B{base['batch']}.json"
        if run.is_file():
            yield base, json.loads(run.read_text())


def _records(out: Path, rel: str) -> tuple[dict[str, Any], list[list[RequestRecord]]]:
    saved = json.loads((out / rel).read_text())
    return saved, [[RequestRecord.from_dict(r) for r in recs] for recs in saved["repeats"]]


def reanalyse(out: Path, repredict: bool = False) -> dict[str, Any]:
    """DIR/results.json with every run row's measured figures, errors and elasticities
    recomputed from DIR/runs/ (ValueError: the run's plans do not reproduce here, unless
    ``repredict``: then today's planner predicts them, module doc)."""
    from coordinator.planner.plan import Plan
    from coordinator.planner.workload import parse_workload

    path = out / "results.json"
    if not path.is_file():
        raise ValueError(f"{out} holds no results.json to reanalyse")
    results = json.loads(path.read_text())
    meta = results["meta"]
    workload = parse_workload(meta["workload"])
    s99 = int(meta["p99_output"])
    bounds = results.get("bounds") or {}
    for base, saved in _baseline_runs(out, bounds):
        base["cpu_stretch"] = run_stretch(worker_busy((saved.get("stats") or [{}])[-1]))
    if repredict:
        _refit(out, results)
    profile = _profile(results)
    bounds["cpu_stretch"] = reference = calibration_stretch(bounds.get("baseline") or [])
    for row in results["rows"]:
        if not row.get("records"):
            continue
        saved, repeats = _records(out, row["records"])
        plan = Plan.from_dict(saved["plan"])
        again = predicted_under(plan, workload, profile) or {}
        if repredict:
            row.setdefault("predicted_at_run", row["predicted"])
            row["predicted"] = {key: again.get(key) for key in row["predicted"]}
        for key in CHECKED:
            a, b = row["predicted"].get(key), again.get(key)
            if a is not None and (b is None or not math.isclose(a, b, rel_tol=REL_TOL)):
                raise ValueError(f"{row['policy']} at bound {row['bound_s']}: the plan predicts "
                                 f"{key} = {b} on today's profile, the run recorded {a}; the "
                                 "profile or the planner changed since, so this run cannot "
                                 "be reanalysed (--repredict predicts it again)")
        per = [measure(recs, s99, row["bound_s"]) for recs in repeats]
        workers = worker_busy(saved["stats"][-1] if saved.get("stats") else {})
        row["measured"] = median_of(per) | {
            "repeats": len(per), "load_avg_1min": saved.get("load_avg_1min", []),
            "workers": workers, "cpu_stretch": run_stretch(workers)}
        row["error"] = relative_errors(row["predicted"], row["measured"])
        row["error_at_run_load"] = errors_at_run_load(row["predicted"], row["measured"],
                                                      reference)
        row["elasticity"] = elasticities(plan, workload, profile)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    meta["reanalysed"] = stamp
    if repredict:
        meta["repredicted"] = (f"{stamp}: the run's plans predicted again by today's planner "
                               "and calibration (refitted from its baseline runs); the "
                               "planner may choose other plans now")
    return results


def _refit(out: Path, results: dict[str, Any]) -> None:
    """Fit the calibration again from the recorded baseline runs into ``results``, with each
    run's TPOT and encode pass predicted by today's planner on the uncalibrated profile."""
    from coordinator.bench.calibrate import encode_passes, fit_pass_model
    from coordinator.planner.plan import Plan
    from coordinator.planner.workload import parse_workload

    bounds = results.get("bounds") or {}
    if not bounds.get("calibration"):
        return
    base_profile = _profile({**results, "bounds": {}})
    workload = parse_workload(results["meta"]["workload"])
    for base, saved in _baseline_runs(out, bounds):
        plan = Plan.from_dict(saved["plan"])
        repeats = [[RequestRecord.from_dict(r) for r in recs] for recs in saved["repeats"]]
        now = predicted_under(plan, workload, base_profile) or {}
        base["predicted_tpot_s"] = now.get("tpot_s", base.get("predicted_tpot_s"))
        base["predicted_latency_p99len_s"] = now.get("latency_p99len_s",
                                                     base.get("predicted_latency_p99len_s"))
        passes = encode_passes(repeats[-1], plan, base_profile) if repeats else None
        if passes is not None:
            base["encode_pass_s"], base["predicted_encode_pass_s"] = passes
    fit = fit_pass_model(bounds["baseline"])
    if fit is not None:
        bounds["calibration"] = fit.to_json()
        source = str(results["meta"]["profile"]).split(" x ")[0]
        results["meta"]["profile"] = (f"{source} x {fit.compute_factor:.3g} + "
                                      f"{fit.stage_overhead_s * 1e3:.3g} ms/pass")
