"""Profiles: JSON round trip, interpolation, compatibility checks, analytic roofline."""

from __future__ import annotations

import numpy as np
import pytest

from common.models.config import ModelConfig
from coordinator.planner.analytic import GPUS, analytic_profile, parse_profile_arg
from coordinator.planner.profile import Profile, ProfileMismatch


def _tiny_profile() -> Profile:
    meta = {"device": "cpu", "dtype": "bfloat16", "torch_version": "x", "num_threads": 1,
            "model": ModelConfig.preset("tiny-llama").to_dict(), "date": "2026-01-01",
            "source": "measured"}
    rows = []
    for b in (1, 4):
        for s in (16, 64):
            rows.append({"op": "dec_layer_attn", "tp": 1, "batch": b, "seq_len": s,
                         "tokens": 0, "bytes": 0, "time_s": 1e-3 * b * s})
    for n, t in ((1, 1.0), (10, 2.0), (100, 20.0)):
        rows.append({"op": "dec_layer_rest", "tp": 1, "batch": 0, "seq_len": 0, "tokens": n,
                     "bytes": 0, "time_s": t})
    return Profile(meta, rows)


def test_interpolation_exact_on_grid_linear_between_and_extrapolates() -> None:
    p = _tiny_profile()
    assert p.attn("dec", 1, 4, 64) == pytest.approx(0.256)
    assert p.attn("dec", 1, 2.5, 40) == pytest.approx(1e-3 * 2.5 * 40, rel=0.05)
    assert p.rest("dec", 1, 55) == pytest.approx(11.0)
    assert p.rest("dec", 1, 200) == pytest.approx(40.0)  # last segment's slope
    assert p.rest("dec", 1, 0) == 0.0
    arr = p.rest("dec", 1, np.array([1.0, 10.0, 55.0]))
    assert arr.tolist() == pytest.approx([1.0, 2.0, 11.0])


def test_round_trip_and_mismatch(tmp_path) -> None:  # noqa: ANN001
    prof = analytic_profile("a100", ModelConfig.preset("opt-13b"))
    path = tmp_path / "p.json"
    prof.save(path)
    back = Profile.load(path, ModelConfig.preset("opt-13b"), "float16")
    assert back.rows == prof.rows and back.tp_sizes == [1, 2, 4, 8]
    assert back.rest("dec", 2, 77) == pytest.approx(prof.rest("dec", 2, 77))
    with pytest.raises(ProfileMismatch, match="opt-13b"):
        Profile.load(path, ModelConfig.preset("gpt3-39b"))
    with pytest.raises(ProfileMismatch, match="bfloat16"):
        Profile.load(path, dtype="bfloat16")


def test_bad_profiles_are_rejected() -> None:
    p = _tiny_profile()
    with pytest.raises(ValueError, match="lacks"):
        Profile({"dtype": "float16"}, [])
    with pytest.raises(ValueError, match="unknown profile op"):
        Profile(p.meta, [{"op": "nope", "tp": 1}])
    with pytest.raises(ValueError, match="tp=2"):
        p.rest("dec", 2, 10)
    with pytest.raises(ValueError, match="analytic:GPU:MODEL"):
        parse_profile_arg("analytic:a40")


def test_analytic_roofline_regimes() -> None:
    """Decode of one token is bound by weight reads; a big prefill by FLOPs."""
    model = ModelConfig.preset("opt-13b")
    prof = analytic_profile("a40", model)
    gpu = GPUS["a40"]
    weights = model.param_bytes_per_layer("decoder", 2)
    t1 = prof.rest("dec", 1, 1)
    assert t1 == pytest.approx(weights / (gpu.hbm_bytes_s * gpu.eff_mem), rel=0.1)
    n = 8192
    flops = 2 * n * model.params_per_layer("decoder")
    assert prof.rest("enc", 1, n) == pytest.approx(flops / (gpu.peak_flops * gpu.eff_flops),
                                                   rel=0.1)
    # TP shards the weights: the memory-bound step gets ~2x faster at tp=2
    assert prof.rest("dec", 2, 1) == pytest.approx(t1 / 2, rel=0.15)
    assert prof.op("allreduce", 2, 1e6) > prof.op("allreduce", 2, 1e3) > 0
    assert prof.op("allreduce", 1, 1e6) == 0.0


def test_noisy_measurements_stay_monotone_beyond_the_grid() -> None:
    """A measured grid where a bigger size timed faster (noise) must not extrapolate to
    shrinking or negative costs."""
    p = _tiny_profile()
    rows = [r for r in p.rows if r["op"] != "dec_layer_rest"]
    for n, t in ((1, 2.0), (8, 3.0), (32, 1.5)):
        rows.append({"op": "dec_layer_rest", "tp": 1, "batch": 0, "seq_len": 0, "tokens": n,
                     "bytes": 0, "time_s": t})
    noisy = Profile(p.meta, rows)
    sizes = [1, 8, 16, 32, 64, 512, 4096]
    costs = [noisy.rest("dec", 1, n) for n in sizes]
    assert all(b >= a for a, b in zip(costs, costs[1:], strict=False))
    assert costs[-1] > costs[3] > 0
    assert noisy.attn("dec", 1, 64, 64) == pytest.approx(p.attn("dec", 1, 4, 64) * 16)


def test_profile_command_writes_a_loadable_analytic_profile(tmp_path) -> None:  # noqa: ANN001
    from coordinator.cli import main

    out = tmp_path / "t5.json"
    assert main(["profile", "--analytic", "h100", "--model", "tiny-t5", "--tp", "1,2",
                 "--out", str(out)]) == 0
    prof = Profile.load(out, ModelConfig.preset("tiny-t5"), "float16")
    assert prof.tp_sizes == [1, 2] and prof.meta["source"] == "analytic:h100"
