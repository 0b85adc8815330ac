"""Calibrating the profile to the mesh as it runs during the bench.

A measured profile times each layer in CPU time of one thread (`meta.compute_clock` = "cpu")
inside one process. The mesh adds two things it cannot see:

- **contention**: on a 2-core machine at load L a worker gets about 2/L of a core, so every
  compute-bound second stretches (the first SmolLM2 runs here: 4-6x at load 8-10);
- **fixed per-pass overhead**: every stage pass also pays the coordinator's round trip,
  message framing and transport, the worker's Python around the engine call and the stage
  hand-off, a cost that does not grow with the batch (~10 ms per stage pass here, against a
  27 ms whole-model decode step of SmolLM2 at batch 1).

One global factor (what this module did first) folds the second into the first: fitted on
small-batch passes, where the fixed part dominates, it over-scales large-batch passes (the
first S/4 run: x1.84 fitted, exegpt's WAA encode passes took 1.37x, +32% throughput error).
So a stage pass is modelled as ``c * compute + o``, and the static baseline runs that
`--bounds auto` makes anyway fit both. A static plan of P stages runs P streams; every round
passes each stream through each stage, so each stage runs P passes per round and (stages
balanced or not) ``round = c * round_compute + P * o`` exactly (``costs.round_time``: both
terms of its max gain P * o). The measured time per output token of batch B is one round:

    tpot_measured(B) = c * tpot_predicted(B) + P * o

and one encode pass (a batch's prompts through the P stages) is

    encode_measured(B) = c * encode_predicted(B) + P * o.

Each run gives its own pair from its two kinds of pass at one load: an encode pass is mostly
compute and a small-batch decode step mostly fixed cost, ``c = (E - D) / (E_pred - D_pred)``,
``o = (D - c D_pred) / P``; the medians over the runs are used when at least ``MIN_PER_RUN``
runs give one. The measured encode pass is the median over the run's batches (the P streams'
first encodes start together and queue behind each other). This is the first choice since
2026-11-24: least squares of the TPOTs alone across batch sizes is ill-conditioned (the
predicted TPOTs of B = 1..16 span only ~2.5x, and c and o trade off along it), and a
multi-stream static TPOT on the mesh also holds the other streams' encodes, which the closed
form puts before the first token instead (docs/planner.md, static). On the 23:36 T/4 run the
least squares came out c = 1.64, o = 3.5 ms with every residual under 8%, and was taken; the
runs' own pairs gave c 0.95-1.31 (median 1.20), o 10.1-12.0 ms, and the workers' own busy
clocks (compute on the wall, regressed on the profile's compute of the same passes) c 1.18,
o 6.9 ms inside the worker. 9 of that run's 10 plan runs measured more throughput than
predicted (up to +25%) and all 10 a shorter p99-length latency (up to -53%). Without two
such runs (no run's encode pass is larger than its decode step, as on a tiny model) the
least squares is used if physical and within ``MAX_RESIDUAL`` of every run; otherwise the
candidate with the smallest worst
TPOT residual is taken among the physical least squares, the per-run medians, one factor
(o = 0, c = the median TPOT ratio) and the profile as measured plus an overhead (c = 1, o =
the median of (TPOT - predicted) / P): on tiny-t5 at load 6 the least squares (c 0.74, o 4.4
ms, worst 13%) against one factor (4.6x, off by up to 60%), which an older rule took.
``method`` says which was used, with what the least squares alone would have given.

**Encode passes get their own factor** (``encode_factor``, ``ENCODE_OPS`` rows). A prefill
is a few large oneDNN GEMMs (compute-bound), a decode step the C kernel streaming the weights
(memory-bound) plus per-sequence Python: on this shared VM the two slow down differently, in
thread CPU time too (the 4 linears of a SmolLM2 layer at 2048 rows: 192 ms of CPU at load
~0.5, 209 ms at load ~3; docs/profiling.md, "Encode passes vs the profile"). In the S/4 run
the TPOTs pinned c = 1.07 while the mesh's large encode passes ran 1.06-1.11x their profiled
compute per run (the first passes of a run up to 1.2-1.3x), and the WAA-C plans (one encoder
worker, B_E 18 and 32, ~1200-2300-token packed prompts) missed TTFT by +9% and the
p99-length latency by +10-12% while their TPOT was right. So after (c, o), the baseline
runs' compute-dominated encode passes (predicted >= ``ENCODE_MIN_OVERHEADS`` x their fixed
part) give ``encode_factor``, the median of their
``(E - P o) / E_pred`` weighted by ``E_pred``: the largest passes, those a large-B_E plan
resembles, weigh most, and one slow run does not carry it (the S/4 baselines: 0.99, 0.99,
1.37, 1.17 at B = 2, 4, 8, 16 -> 1.17; their ratio of sums, 1.19, followed the 1.37, and the
bound runs' own large encode passes ran 1.06-1.11). Without such a pass it is c.

The profile's rows are multiplied by c (encode rows by ``encode_factor``) and
``meta["mesh_overhead_s"]`` gets o for every kind of stage pass (``costs.PASS_KINDS``): a WAA
encoder pass and a WAA decoder iteration go through the same path (a message in, the engine
call, a message out to the next worker or the coordinator), and ``tests/runner/measure_gap.py``
measures both per pass to check it. The KV hand-off's own transfer is the profile's
``kv_handoff`` row, measured on the real transport; it gets no extra fixed term (its message
is the WAA encoder pass's message out).
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HANDOFF_FIXED_S = 0.0  # see the module doc: the hand-off message is part of the encoder pass
MAX_RESIDUAL = 0.10  # the TPOT least squares is used only if it explains every run this well
MIN_PER_RUN = 2  # runs with an encode-pass + TPOT pair that make the per-run fit the first choice
ENCODE_OPS = ("enc_layer_attn", "enc_layer_rest")  # the rows encode_factor scales
ENCODE_MIN_OVERHEADS = 5.0  # an encode pass fits encode_factor if its compute is >= 5 x P * o


@dataclass(frozen=True)
class PassFit:
    """``measured = compute_factor * predicted + stages * stage_overhead_s`` per baseline."""

    compute_factor: float
    stage_overhead_s: float
    method: str  # "least squares" | "per run ..." | "<fallback>, the smallest worst ..."
    points: list[dict[str, float]] = field(default_factory=list)
    encode_factor: float | None = None  # encode rows' factor (module doc); None: compute_factor

    def __post_init__(self) -> None:
        if not self.compute_factor > 0:
            raise ValueError(f"a compute factor must be > 0, got {self.compute_factor}")
        if self.encode_factor is not None and not self.encode_factor > 0:
            raise ValueError(f"an encode factor must be > 0, got {self.encode_factor}")
        if not self.stage_overhead_s >= 0:
            raise ValueError(f"a per-pass overhead must be >= 0 s, got {self.stage_overhead_s}")

    def overheads(self) -> dict[str, float]:
        """``meta["mesh_overhead_s"]`` of the calibrated profile."""
        o = self.stage_overhead_s
        return {"stage": o, "waa_encode": o, "waa_decode": o, "handoff": HANDOFF_FIXED_S}

    @property
    def encode_compute_factor(self) -> float:
        return self.compute_factor if self.encode_factor is None else self.encode_factor

    def to_json(self) -> dict[str, Any]:
        return {"compute_factor": self.compute_factor,
                "encode_factor": self.encode_compute_factor,
                "stage_overhead_s": self.stage_overhead_s,
                "mesh_overhead_s": self.overheads(), "method": self.method,
                "points": self.points}


def _points(baseline: list[dict[str, Any]]) -> list[dict[str, float]]:
    keys = ("encode_pass_s", "predicted_encode_pass_s")
    return [{"batch": float(b["batch"]), "stages": float(b.get("stages", 1)),
             "predicted_tpot_s": float(b["predicted_tpot_s"]), "tpot_s": float(b["tpot_s"]),
             **{k: float(b[k]) for k in keys if b.get(k)}}
            for b in baseline if b.get("tpot_s") and b.get("predicted_tpot_s")]


def _per_run(p: dict[str, float]) -> tuple[float, float] | None:
    """(c, o) from one run's encode pass and TPOT (None: not measured, or unphysical)."""
    if "encode_pass_s" not in p or "predicted_encode_pass_s" not in p:
        return None
    e, d = p["encode_pass_s"], p["tpot_s"]
    e_pred, d_pred = p["predicted_encode_pass_s"], p["predicted_tpot_s"]
    if e_pred <= d_pred:
        return None
    c = (e - d) / (e_pred - d_pred)
    o = (d - c * d_pred) / p["stages"]
    return (c, o) if c > 0 and o >= 0 else None


def fit_pass_model(baseline: list[dict[str, Any]]) -> PassFit | None:
    """Fit (c, o) from each run's encode pass + TPOT (medians over runs) when at least
    ``MIN_PER_RUN`` runs give a pair, else from the TPOTs across batch sizes (least squares),
    else one factor (module doc). None: no run measured a TPOT."""
    pts = _points(baseline)
    if not pts:
        return None
    runs = [(p, _per_run(p)) for p in pts]
    for p, f in runs:
        p["run_c"], p["run_o_s"] = f if f else (float("nan"), float("nan"))
    pred = np.array([p["predicted_tpot_s"] for p in pts])
    meas = np.array([p["tpot_s"] for p in pts])
    stages = np.array([p["stages"] for p in pts])
    why = "one baseline batch size: two unknowns need two"
    lsq: tuple[float, float, float] | None = None  # (c, o, worst residual)
    if len(set(np.round(pred, 12))) >= 2:
        (c, p_o), *_ = np.linalg.lstsq(np.stack([pred, stages], axis=1), meas, rcond=None)
        lsq = (float(c), float(p_o), _worst(float(c), float(p_o), pred, meas, stages))
        why = (f"least squares over the TPOTs alone gave c = {c:.3g}, o = {p_o * 1e3:.3g} ms, "
               f"worst residual {lsq[2]:.0%}")
    good = [f for _p, f in runs if f is not None]
    if len(good) >= MIN_PER_RUN:  # each run's two kinds of pass at one load (module doc)
        return _with_fitted(PassFit(statistics.median(c for c, _ in good),
                                    statistics.median(o for _, o in good),
                                    f"per run (encode pass + TPOT), median of {len(good)}; "
                                    f"{why}"), pts)
    fallback: list[tuple[float, float, str]] = []  # (c, o, method): physical, not exact
    if lsq is not None and lsq[0] > 0 and lsq[1] >= 0:
        if lsq[2] <= MAX_RESIDUAL:
            return _with_fitted(PassFit(lsq[0], lsq[1], "least squares"), pts)
        fallback.append((lsq[0], lsq[1], "least squares"))
    if good:
        fallback.append((statistics.median(c for c, _ in good),
                         statistics.median(o for _, o in good), "per run (encode pass + TPOT)"))
    fallback.append((float(statistics.median(meas / pred)), 0.0, "median ratio (o = 0)"))
    o_only = float(statistics.median((meas - pred) / stages))
    if o_only > 0:
        fallback.append((1.0, o_only, "the profile as measured (c = 1) + median overhead"))
    c, p_o, how = min(fallback, key=lambda f: _worst(f[0], f[1], pred, meas, stages))
    return _with_fitted(PassFit(c, p_o, f"{how}, the smallest worst residual "
                                        f"({_worst(c, p_o, pred, meas, stages):.0%}) of "
                                        f"{len(fallback)} fits: {why}"), pts)


def _worst(c: float, o: float, pred: np.ndarray, meas: np.ndarray, stages: np.ndarray
           ) -> float:
    """The largest relative residual of ``c * pred + stages * o`` over the baseline TPOTs."""
    return float(np.max(np.abs(meas / (c * pred + o * stages) - 1)))


def _with_fitted(fit: PassFit, pts: list[dict[str, float]]) -> PassFit:
    """The fit with its encode factor, each point's fitted value and relative residual (the
    fit's own error)."""
    enc, used = encode_factor(pts, fit.stage_overhead_s)
    out = []
    for p in pts:
        fitted = fit.compute_factor * p["predicted_tpot_s"] + p["stages"] * fit.stage_overhead_s
        out.append({**p, "fitted_tpot_s": fitted, "residual": p["tpot_s"] / fitted - 1})
    method = fit.method if enc is None else (
        f"{fit.method}; encode rows x {enc:.3g} from {used} encode pass(es)")
    return PassFit(fit.compute_factor, fit.stage_overhead_s, method, out, enc)


def encode_factor(pts: list[dict[str, float]], overhead_s: float) -> tuple[float | None, int]:
    """(the size-weighted median of ``(E - P o) / E_pred`` over the compute-dominated encode
    passes, how many), or (None, 0) when no run measured one (module doc). A fit without a
    fixed part (o = 0: one factor) cannot tell a compute-dominated pass from one that is all
    fixed cost, so it gets none: on tiny-t5 every 15-40 ms encode pass of 1.6-5 ms profiled
    compute read as x7.96 compute, and the WAA encoder was predicted at half its speed."""
    if overhead_s <= 0:
        return None, 0
    used = [p for p in pts if p.get("encode_pass_s") and p.get("predicted_encode_pass_s")
            and p["predicted_encode_pass_s"] >= ENCODE_MIN_OVERHEADS * p["stages"] * overhead_s]
    if not used:
        return None, 0
    ratios = sorted(((p["encode_pass_s"] - p["stages"] * overhead_s)
                     / p["predicted_encode_pass_s"], p["predicted_encode_pass_s"]) for p in used)
    half, seen = sum(w for _, w in ratios) / 2, 0.0
    for ratio, weight in ratios:
        seen += weight
        if seen >= half:
            return (ratio, len(used)) if ratio > 0 else (None, 0)
    raise AssertionError("unreachable: the weights sum to 2 x half")


def encode_passes(records: list[Any], plan: Any, profile: Any) -> tuple[float, float] | None:
    """(measured, predicted) median encode pass of a run: encode start -> end of each batch
    (requests sharing an encode start) against the profile's compute for that batch's actual
    lengths through the plan's pipeline stages (no fixed overhead: that is what is fitted)."""
    from coordinator.planner.costs import Costs
    from coordinator.planner.layout import build_pipeline, tp_stage_sizes

    costs = Costs(profile)
    tps = tp_stage_sizes(plan.num_workers, int(plan.search.get("tp", 1)),
                         int(plan.search.get("num_tp_workers", 0)))
    pipe = build_pipeline(profile, tps, enc=True, dec=True)
    groups: dict[float, list[Any]] = {}
    for r in records:
        if r.ok and r.t_encode_end is not None:
            groups.setdefault(r.t_encode_start, []).append(r)
    if pipe is None or not groups:
        return None
    meas, pred = [], []
    for start, recs in groups.items():
        lens = np.array([r.input_len for r in recs], np.float64)
        meas.append(max(r.t_encode_end for r in recs) - start)
        pred.append(sum(costs.encode_stage(st, len(recs), float(lens.mean()),
                                           float(np.sqrt((lens ** 2).mean())), None)
                        for st in pipe))
    return statistics.median(meas), statistics.median(pred)


def contention_factor(baseline: list[dict[str, Any]]) -> float | None:
    """Median measured / predicted time per output token over the baseline runs (None: no
    run measured one): the one-factor calibration, kept for `measure_gap` comparisons."""
    ratios = [b["tpot_s"] / b["predicted_tpot_s"] for b in baseline
              if b.get("tpot_s") and b.get("predicted_tpot_s")]
    return statistics.median(ratios) if ratios else None


def calibrated_profile(profile: Any, fit: PassFit, source: str) -> Any:
    """A copy of ``profile`` with compute times x ``fit.compute_factor`` and the fitted fixed
    per-pass overheads in ``meta["mesh_overhead_s"]``."""
    out = scaled_profile(profile, fit.compute_factor, source, fit.encode_factor)
    out.meta["mesh_overhead_s"] = fit.overheads()
    out.meta["calibration"] = {"factor": fit.compute_factor, "source": source, **fit.to_json()}
    return type(profile)(meta=out.meta, rows=out.rows)  # rebuilt: Costs reads meta once


def scaled_profile(profile: Any, factor: float, source: str,
                   enc_factor: float | None = None) -> Any:
    """A copy of ``profile`` with every compute time multiplied by ``factor``, the encode rows
    (``ENCODE_OPS``, and the encode pass overheads) by ``enc_factor`` if given (a fixed
    per-pass overhead already in ``meta["mesh_overhead_s"]`` is the mesh's, not scaled)."""
    from coordinator.planner.profile import Profile

    enc = factor if enc_factor is None else enc_factor
    if not factor > 0 or not enc > 0:
        raise ValueError(f"a calibration factor must be > 0, got {factor} (encode {enc})")
    meta = copy.deepcopy(profile.meta)
    for row in meta.get("pass_overhead") or []:
        row["time_s"] = float(row["time_s"]) * (enc if row.get("phase") == "encode" else factor)
    meta["calibration"] = {"factor": factor, "source": source}
    if enc_factor is not None:
        meta["calibration"]["encode_factor"] = enc
    rows = [{**r, "time_s": float(r["time_s"]) * (enc if r["op"] in ENCODE_OPS else factor)}
            for r in profile.rows]
    return Profile(meta=meta, rows=rows)
