"""Calibration gives encode passes their own compute factor (coordinator/bench/calibrate.py).

Why: in the S/4 SmolLM2 run (/tmp/bS96, c = 1.07, o = 10.7 ms from the TPOTs) the WAA-C plans
at B_E 18 and 32 missed TTFT by +9% and the p99-length latency by +10-12% while their TPOT
was right: the static baselines' large encode passes had run 1.17-1.37x their predicted
compute, the decode steps ~1.07x. One factor cannot price both kinds of pass; these tests
check the second factor's formula and where it is applied, by hand computation (no timing).
"""

from __future__ import annotations

import pytest

from common.models.config import ModelConfig
from coordinator.bench.calibrate import (
    ENCODE_OPS,
    PassFit,
    calibrated_profile,
    encode_factor,
    fit_pass_model,
    scaled_profile,
)
from coordinator.planner.analytic import analytic_profile
from coordinator.planner.costs import Costs
from coordinator.planner.layout import build_pipeline

# The S/4 run's static baselines (results.json bounds.calibration.points), P = 2 stages
S4_BASELINE = [
    {"batch": 1, "stages": 2, "predicted_tpot_s": 0.01879570300724654,
     "tpot_s": 0.04596095272171025, "encode_pass_s": 0.2423079013824463,
     "predicted_encode_pass_s": 0.09663323450290812},
    {"batch": 2, "stages": 2, "predicted_tpot_s": 0.024729899000028865,
     "tpot_s": 0.04447168870585522, "encode_pass_s": 0.38930797576904297,
     "predicted_encode_pass_s": 0.37259240969147356},
    {"batch": 4, "stages": 2, "predicted_tpot_s": 0.02578972523172008,
     "tpot_s": 0.048345134590720956, "encode_pass_s": 0.7793583869934082,
     "predicted_encode_pass_s": 0.7671481771739151},
    {"batch": 8, "stages": 2, "predicted_tpot_s": 0.04141067400006193,
     "tpot_s": 0.0666917584441204, "encode_pass_s": 2.2596969604492188,
     "predicted_encode_pass_s": 1.6308233557497318},
    {"batch": 16, "stages": 2, "predicted_tpot_s": 0.06263015242483294,
     "tpot_s": 0.12063830644051438, "encode_pass_s": 4.1484328508377075,
     "predicted_encode_pass_s": 3.5414093789773684},
]


def _runs(c: float, c_enc: float, o: float) -> list[dict[str, float]]:
    """Baselines whose TPOTs follow c x pred + P o and encode passes c_enc x pred + P o."""
    out = []
    for i, (d_pred, e_pred) in enumerate([(0.027, 0.30), (0.029, 0.70), (0.036, 1.6),
                                          (0.051, 3.5)]):
        out.append({"batch": 2**i, "stages": 2, "predicted_tpot_s": d_pred,
                    "tpot_s": c * d_pred + 2 * o, "predicted_encode_pass_s": e_pred,
                    "encode_pass_s": c_enc * e_pred + 2 * o})
    return out


def test_encode_passes_get_their_own_factor() -> None:
    # one run with an encode pass: too few for the per-run fit, so the TPOTs' least squares
    # gives (c, o) and the encode pass its own factor
    runs = _runs(1.0, 1.25, 0.01)
    runs = [{k: v for k, v in r.items() if "encode" not in k} for r in runs[:-1]] + runs[-1:]
    fit = fit_pass_model(runs)
    assert fit is not None and fit.method.startswith("least squares")
    assert fit.compute_factor == pytest.approx(1.0)
    assert fit.stage_overhead_s == pytest.approx(0.01)
    assert fit.encode_factor == pytest.approx(1.25)
    assert fit.to_json()["encode_factor"] == pytest.approx(1.25)


def test_encode_factor_is_the_size_weighted_median_over_compute_dominated_passes() -> None:
    """The S/4 run by hand: o = 10.7 ms, P = 2; the batch-1 pass (97 ms predicted < 5 x 21 ms)
    is mostly fixed cost and left out; the others' (E - 2 o) / E_pred, sorted, with their
    E_pred as weights: B = 2 (0.987, 0.37 s), 4 (0.988, 0.77 s), 16 (1.165, 3.54 s), 8 (1.372,
    1.63 s); half the weight (3.16 s) is reached at B = 16's ratio, not at the slow B = 8's."""
    o = 0.010718054017376282
    by_batch = {p["batch"]: (p["encode_pass_s"] - 2 * o) / p["predicted_encode_pass_s"]
                for p in S4_BASELINE}
    got, count = encode_factor([dict(p) for p in S4_BASELINE], o)
    assert count == 4 and got == pytest.approx(by_batch[16])
    assert 1.16 < got < 1.17  # the run's TPOT-pinned c was 1.07
    assert by_batch[8] > 1.37  # the outlier a ratio of sums (1.19) would have followed
    fit = fit_pass_model([dict(p) for p in S4_BASELINE])
    assert fit is not None and fit.compute_factor == pytest.approx(1.0746, abs=1e-3)
    assert fit.encode_factor == pytest.approx(got)


def test_without_a_compute_dominated_encode_pass_encode_uses_c() -> None:
    small = [{**p, "predicted_encode_pass_s": 0.05, "encode_pass_s": 0.2}
             for p in _runs(1.0, 1.0, 0.01)]  # 50 ms < 5 x 2 x 10 ms
    fit = fit_pass_model(small)
    assert fit is not None and fit.encode_factor is None
    assert fit.encode_compute_factor == fit.compute_factor
    tpot_only = [{k: v for k, v in p.items() if "encode" not in k} for p in _runs(1, 1, 0.01)]
    assert encode_factor(tpot_only, 0.01) == (None, 0)
    with pytest.raises(ValueError, match="encode factor"):
        PassFit(1.0, 0.0, "x", encode_factor=0.0)


def test_calibrated_profile_scales_encode_rows_only_by_the_encode_factor() -> None:
    """By hand: an encode stage pass = layers x (attn + rest) x c_enc + (embed, LM head,
    stage send) x c + o; a decode step = everything x c + o."""
    profile = analytic_profile("a40", ModelConfig.preset("opt-13b"), "float16")
    c, c_enc, o = 1.1, 1.4, 0.004
    cal = calibrated_profile(profile, PassFit(c, o, "test", encode_factor=c_enc), "test")
    assert cal.meta["calibration"]["encode_factor"] == c_enc
    raw, got = Costs(profile), Costs(cal)
    pipe = build_pipeline(profile, [1, 1], enc=True, dec=True)
    assert pipe is not None
    batch, mean, eff = 4.0, 256.0, 300.0
    for st in pipe:
        layers = st.num_dec  # decoder-only: the encode pass runs the decoder layers
        core = layers * (profile.attn("enc", 1, batch, eff) + profile.rest("enc", 1, batch * mean))
        whole = raw.encode_stage(st, batch, mean, eff, None)
        want = c_enc * core + c * (whole - core) + o
        assert got.encode_stage(st, batch, mean, eff) == pytest.approx(want)
        assert got.decode_stage(st, 8.0, 300.0) == pytest.approx(
            c * raw.decode_stage(st, 8.0, 300.0) + o)
    rows = scaled_profile(profile, c, "t", c_enc).rows
    for before, after in zip(profile.rows, rows, strict=True):
        k = c_enc if before["op"] in ENCODE_OPS else c
        assert after["time_s"] == pytest.approx(k * before["time_s"])


def test_a_fit_without_a_fixed_part_gives_encode_passes_no_factor_of_their_own() -> None:
    """tiny-t5 (23:58 run, baselines B = 1..8): no run's encode pass is larger than its decode
    step, so the one-factor fallback (o = 0) is taken. Every 15-40 ms encode pass of 1.6-5 ms
    profiled compute then read as compute x7.96 and the WAA-C plan was predicted at 55% of the
    243 seq/s it ran. With o = 0 nothing tells compute from fixed cost: the encode rows take c."""
    pts = [(1, 0.0019, 0.0064, 0.0155, 0.0016), (2, 0.0022, 0.0066, 0.0145, 0.0024),
           (4, 0.0027, 0.0077, 0.0273, 0.0031), (8, 0.0028, 0.0122, 0.0401, 0.0050)]
    runs = [{"batch": b, "stages": 2, "predicted_tpot_s": dp, "tpot_s": dm,
             "encode_pass_s": em, "predicted_encode_pass_s": ep} for b, dp, dm, em, ep in pts]
    fit = fit_pass_model(runs)
    assert fit is not None and fit.stage_overhead_s == 0.0
    assert fit.encode_factor is None and "encode rows" not in fit.method
    assert encode_factor(S4_BASELINE, 0.0) == (None, 0)
