"""`exegpt bench --reanalyse DIR`: recompute an evaluation's figures from what it recorded.

Every mesh run's request lifecycles are kept in DIR/runs/ and every plan with them, so the
measured figures, errors, elasticities, tables and plots can be recomputed without running
the mesh again (after a change to how they are computed, or to read an old run with today's
report). The profile is the one the run planned with: the uncalibrated profile it names,
scaled by the calibration it recorded. Every re-simulated plan must reproduce the prediction
the run recorded, or the reanalysis stops: a profile re-measured since would explain nothing
about that run.
"""

from __future__ import annotations

import json
import math
import time
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


def _records(out: Path, rel: str) -> tuple[dict[str, Any], list[list[RequestRecord]]]:
    saved = json.loads((out / rel).read_text())
    return saved, [[RequestRecord.from_dict(r) for r in recs] for recs in saved["repeats"]]


def reanalyse(out: Path) -> dict[str, Any]:
    """DIR/results.json with every run row's measured figures, errors and elasticities
    recomputed from DIR/runs/ (ValueError: the run's plans do not reproduce here)."""
    from coordinator.planner.plan import Plan
    from coordinator.planner.workload import parse_workload

    path = out / "results.json"
    if not path.is_file():
        raise ValueError(f"{out} holds no results.json to reanalyse")
    results = json.loads(path.read_text())
    meta = results["meta"]
    profile = _profile(results)
    workload = parse_workload(meta["workload"])
    s99 = int(meta["p99_output"])
    bounds = results.get("bounds") or {}
    for base in bounds.get("baseline") or []:
        run = out / "runs" / f"baseline-static-B{base['batch']}.json"
        if run.is_file():
            stats = json.loads(run.read_text()).get("stats") or [{}]
            base["cpu_stretch"] = run_stretch(worker_busy(stats[-1]))
    bounds["cpu_stretch"] = reference = calibration_stretch(bounds.get("baseline") or [])
    for row in results["rows"]:
        if not row.get("records"):
            continue
        saved, repeats = _records(out, row["records"])
        plan = Plan.from_dict(saved["plan"])
        again = predicted_under(plan, workload, profile) or {}
        for key in CHECKED:
            a, b = row["predicted"].get(key), again.get(key)
            if a is not None and (b is None or not math.isclose(a, b, rel_tol=REL_TOL)):
                raise ValueError(f"{row['policy']} at bound {row['bound_s']}: the plan predicts "
                                 f"{key} = {b} on today's profile, the run recorded {a}; the "
                                 "profile or the planner changed since, so this run cannot "
                                 "be reanalysed")
        per = [measure(recs, s99, row["bound_s"]) for recs in repeats]
        workers = worker_busy(saved["stats"][-1] if saved.get("stats") else {})
        row["measured"] = median_of(per) | {
            "repeats": len(per), "load_avg_1min": saved.get("load_avg_1min", []),
            "workers": workers, "cpu_stretch": run_stretch(workers)}
        row["error"] = relative_errors(row["predicted"], row["measured"])
        row["error_at_run_load"] = errors_at_run_load(row["predicted"], row["measured"],
                                                      reference)
        row["elasticity"] = elasticities(plan, workload, profile)
    meta["reanalysed"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return results
