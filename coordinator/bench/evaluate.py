"""The evaluation loop: bounds, then every (bound, policy) plan on the mesh, then the
transformers reference; returns the results tree that `report` writes.

Identical plans are run once: when two bounds give a policy the same schedule (same groups and
knobs), the second reuses the first's request records and is judged against its own bound
(``reused_from`` says so). Each run's records (lifecycles) are saved to ``DIR/runs/*.json``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, replace
from typing import Any

from coordinator.bench import bounds as B
from coordinator.bench.config import BenchConfig
from coordinator.bench.measure import RequestRecord, measure, median_of, relative_errors
from coordinator.bench.meshrun import MeshRun, run_plan
from coordinator.bench.plans import choose_plan, knobs, static_plan
from coordinator.bench.progress import Progress
from coordinator.bench.sensitivity import elasticities
from coordinator.bench.setup import Setup, build_setup
from coordinator.bench.stretch import (
    calibration_stretch,
    errors_at_run_load,
    run_stretch,
    worker_busy,
)

PREDICTED = ("throughput_seq_s", "throughput_tok_s", "latency_p99len_s", "latency_p99_s",
             "ttft_s", "tpot_s", "latency_to_p99_token_s")  # the last: static's (measure.py)


def plan_key(plan: Any) -> str:
    """What makes two plans run identically on the mesh (not their bound or prediction)."""
    d = plan.to_dict()
    return json.dumps({k: d[k] for k in ("policy", "worker_groups", "B_E", "N_D", "B_m",
                                         "adjust", "microbatches")}, sort_keys=True)


def in_flight(plan: Any) -> float:
    """Requests the plan keeps in flight at steady state: the planner's own count (the one
    its ``max_in_flight`` cap bounds, coordinator/planner/inflight.py)."""
    from coordinator.planner.inflight import plan_in_flight

    return plan_in_flight(plan)


class Evaluation:
    """One `exegpt bench` run; ``run()`` returns the results tree."""

    def __init__(self, cfg: BenchConfig, progress: Progress, setup: Setup | None = None) -> None:
        self.cfg, self.progress = cfg, progress
        self.setup = setup or build_setup(cfg, say=progress.say)
        self.cache: dict[str, tuple[str, MeshRun]] = {}  # plan key -> (label, run)
        self.cal_stretch: float | None = None  # the calibration runs' CPU stretch (stretch.py)

    # ------------------------------------------------------------------ runs
    def _run(self, plan: Any, label: str, requests: Any) -> tuple[MeshRun, str | None]:
        key = plan_key(plan)
        if key in self.cache:
            first, run = self.cache[key]
            return run, first
        self.progress.start_run(label, len(requests) * self.cfg.repeats)
        run = run_plan(plan, requests, self.setup.target, runs_path=self.cfg.runs_dir,
                       repeats=self.cfg.repeats, natural_eos=self.cfg.natural_eos,
                       timeout_s=self.cfg.request_timeout_s,
                       startup_timeout_s=self.cfg.startup_timeout_s,
                       done=self.progress.request_done)
        self.cache[key] = (label, run)
        self._save(label, plan, run)
        return run, None

    def _save(self, label: str, plan: Any, run: MeshRun) -> None:
        path = self.cfg.runs_dir / f"{label}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "label": label, "plan": plan.to_dict(), "mesh_run_id": run.run_id,
            "startup_s": run.startup_s, "stats": run.stats, "load_avg_1min": run.load_avg,
            "repeats": [[r.to_dict() for r in recs] for recs in run.repeats]}, default=str))

    def _measured(self, run: MeshRun, bound: float | None) -> dict[str, Any]:
        per = [measure(recs, self.setup.s99, bound) for recs in run.repeats]
        workers = worker_busy(run.stats[-1] if run.stats else {})
        return median_of(per) | {"repeats": len(per), "load_avg_1min": run.load_avg,
                                 "workers": workers, "cpu_stretch": run_stretch(workers)}

    # ------------------------------------------------------------------ bounds
    def bounds(self) -> dict[str, Any]:
        mode = self.cfg.bounds
        if not isinstance(mode, str):
            return {"mode": "given", "bounds": list(mode), "baseline": []}
        if mode == "predicted":
            pts = B.predicted_latencies(self.setup.workload, self.setup.profile,
                                        self.cfg.workers, self._batch_cap())
            return {"mode": mode, "bounds": B.percentile_bounds([lat for _, lat in pts]),
                    "baseline": [{"batch": b, "latency_s": lat} for b, lat in pts]}
        return self._measured_bounds()

    def _batch_cap(self) -> int:
        """The largest static batch the bound sweeps use (bounds.batch_cap, under the cap)."""
        return B.batch_cap(self.cfg.workers, self.cfg.requests, self.cfg.in_flight_cap)

    def _baseline_batches(self) -> list[int]:
        return B.measured_batches(self.cfg.workers, self.cfg.requests, self.cfg.bound_batches,
                                  self.cfg.in_flight_cap)

    def _measured_bounds(self) -> dict[str, Any]:
        from coordinator.bench.workset import draw_requests

        batches = self._baseline_batches()
        baseline = []
        for b in batches:
            plan = static_plan(b, self.setup.workload, self.setup.profile, self.cfg.workers)
            if plan is None:
                baseline.append({"batch": b, "latency_s": None, "note": "out of memory"})
                continue
            reqs = draw_requests(self.setup.workload, B.bound_runs_requests(b, self.cfg.workers),
                                 self.cfg.seed + 1000 + b, self.setup.target.vocab_size,
                                 max_context=self.setup.model_config.max_position)
            run, _ = self._run(plan, f"baseline-static-B{b}", reqs)
            m = self._measured(run, None)
            baseline.append({"batch": b, "latency_s": m.get("latency_max_s"),
                             "latency_p99len_s": m.get("latency_p99len_s"),
                             "throughput_seq_s": m.get("throughput_seq_s"),
                             "tpot_s": m.get("tpot_s"), "load_avg_1min": run.load_avg,
                             "predicted_latency_p99len_s": plan.predicted["latency_p99len_s"],
                             "predicted_tpot_s": plan.predicted["tpot_s"],
                             "stages": len(plan.worker_groups),
                             "cpu_stretch": m.get("cpu_stretch"),
                             **self._encode_passes(run, plan)})
            self.progress.step()
        lats = [x["latency_s"] for x in baseline if x.get("latency_s") is not None]
        self.cal_stretch = calibration_stretch(baseline)
        fit = self._calibrate(baseline)
        if fit is None:
            return {"mode": "auto", "bounds": B.percentile_bounds(lats), "baseline": baseline,
                    "calibration": None, "cpu_stretch": self.cal_stretch}
        # calibrated: the paper's grid (every batch size), timed by the calibrated profile
        pts = B.predicted_latencies(self.setup.workload, self.setup.profile, self.cfg.workers,
                                    self._batch_cap())
        return {"mode": "auto", "bounds": B.percentile_bounds([lat for _, lat in pts]),
                "baseline": baseline, "calibration": fit, "cpu_stretch": self.cal_stretch,
                "calibrated_static": [{"batch": b, "latency_s": lat} for b, lat in pts]}

    def _encode_passes(self, run: MeshRun, plan: Any) -> dict[str, float]:
        """The run's median encode pass, measured and predicted (calibrate.encode_passes)."""
        from coordinator.bench.calibrate import encode_passes

        got = encode_passes(run.repeats[-1], plan, self.setup.profile) if run.repeats else None
        return {} if got is None else {"encode_pass_s": got[0],
                                       "predicted_encode_pass_s": got[1]}

    def _calibrate(self, baseline: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Fit compute x c + o per stage pass to the baseline runs and plan with the profile
        so calibrated (calibrate.py); returns the fit (results.json ``bounds.calibration``)."""
        from coordinator.bench.calibrate import calibrated_profile, fit_pass_model

        fit = fit_pass_model(baseline) if self.cfg.calibrate else None
        if fit is None:
            return None
        c, o = fit.compute_factor, fit.stage_overhead_s
        self.progress.say(f"calibration ({fit.method}): a stage pass on the mesh takes "
                          f"{c:.2f} x the profile's (CPU-time) compute + {o * 1e3:.1f} ms")
        profile = calibrated_profile(self.setup.profile, fit, "static baseline runs, tpot")
        self.setup = replace(self.setup, profile=profile,
                             profile_source=f"{self.setup.profile_source} x {c:.3g} "
                                            f"+ {o * 1e3:.3g} ms/pass")
        return fit.to_json()

    # ------------------------------------------------------------------ policies
    def row(self, bound: float | None, index: int, policy: str) -> dict[str, Any]:
        s = self.setup
        choice = choose_plan(policy, s.workload, s.profile, self.cfg.workers, bound,
                             self.cfg.null_model, self.cfg.in_flight_cap)
        row: dict[str, Any] = {"bound_s": bound, "policy": policy, "note": choice.note,
                               "runnable": choice.runnable, "plan": None, "measured": None}
        if choice.plan is not None:
            plan = choice.plan
            row |= {"plan": {"policy": plan.policy, "knobs": knobs(plan), "B_E": plan.B_E,
                             "N_D": plan.N_D, "B_m": plan.B_m, "B_D": plan.B_D,
                             "worker_groups": [asdict(g) for g in plan.worker_groups]},
                    "predicted": {k: plan.predicted.get(k) for k in PREDICTED},
                    "in_flight": in_flight(plan),
                    "elasticity": elasticities(plan, s.workload, s.profile)}
            row["fills"] = 2 * row["in_flight"] <= len(s.requests)
            if not row["fills"]:
                row["note"] = (row["note"] + "; " if row["note"] else "") + (
                    f"K={len(s.requests)} < 2 x the {row['in_flight']:.0f} requests this plan "
                    "keeps in flight: the run is mostly fill and drain, not steady state")
        if choice.plan is None or not choice.runnable:
            self.progress.step()
            return row
        label = f"bound{index}-{policy}"
        try:
            run, reused = self._run(choice.plan, label, s.requests)
        except Exception as exc:  # noqa: BLE001 - one failed run must not lose the others
            row["note"] = (row["note"] + "; " if row["note"] else "") + \
                f"mesh run failed: {type(exc).__name__}: {exc}"
            self.progress.step()
            return row
        row["measured"] = self._measured(run, bound)
        row["error"] = relative_errors(row["predicted"], row["measured"])
        row["error_at_run_load"] = errors_at_run_load(row["predicted"], row["measured"],
                                                      self.cal_stretch)
        row["records"] = f"runs/{reused or label}.json"
        row["reused_from"] = reused
        self.progress.step()
        return row

    # ------------------------------------------------------------------ reference
    def reference(self) -> dict[str, Any]:
        from coordinator.bench.hfref import reference_problem, run_reference

        problem = (None if self.cfg.reference else "disabled (--no-reference)") or \
            reference_problem(self.setup.model_path)
        if problem is not None:
            return {"skipped": problem}
        self.progress.start_run("transformers reference", 0)
        try:
            out = run_reference(self.setup.model_path, self.cfg.dtype, list(self.setup.requests),
                                batch=self.cfg.reference_batch, threads=1,
                                natural_eos=self.cfg.natural_eos, workdir=self.cfg.runs_dir,
                                timeout_s=self.cfg.request_timeout_s * 4)
        except (RuntimeError, OSError, ValueError) as exc:
            return {"skipped": f"failed: {exc}"}
        finally:
            self.progress.step()
        records = [RequestRecord.from_dict(r) for r in out["records"]]
        (self.cfg.runs_dir / "reference.json").write_text(json.dumps(out))
        return {"batch": self.cfg.reference_batch, "torch_threads": out["torch_threads"],
                "load_s": out["load_s"], "measured": measure(records, self.setup.s99, None),
                "records": "runs/reference.json"}

    # ------------------------------------------------------------------ all
    def total_steps(self, num_bounds: int) -> int:
        return num_bounds * len(self.cfg.policies) + 1

    def run(self) -> dict[str, Any]:
        started = time.time()
        if self.cfg.bounds == "auto":
            self.progress.set_total(len(self._baseline_batches()))
        bounds = self.bounds()
        self.progress.set_total(self.progress.completed + self.total_steps(len(bounds["bounds"])))
        order = sorted(bounds["bounds"], key=lambda b: math.inf if b is None else b)
        rows = [self.row(b, i, p) for i, b in enumerate(order) for p in self.cfg.policies]
        reference = self.reference()
        return {"meta": self.meta(started), "bounds": bounds, "rows": rows,
                "reference": reference}

    def meta(self, started: float) -> dict[str, Any]:
        cfg = self.cfg
        return {"config": {k: (str(v) if k == "out" else v) for k, v in asdict(cfg).items()},
                "model": cfg.model, "null_model": cfg.null_model, "dtype": cfg.dtype,
                "max_in_flight": cfg.in_flight_cap,  # the planner's cap on every plan
                **self.setup.describe(cfg), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                  time.gmtime(started)),
                "wall_s": time.time() - started, "machine": machine()}


def machine() -> dict[str, Any]:
    """Where the numbers come from (the load matters: the machine is shared)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return {"cpu": platform.processor() or platform.machine(), "num_cpus": os.cpu_count(),
            "load_avg_1_5_15": list(load), "python": platform.python_version()}
