"""Grids, row assembly and argument checks: pure functions, no process starts."""

from __future__ import annotations

import pytest

from common.models.config import ModelConfig
from common.profiling import Grid, Timing, measure_profile
from common.profiling.comm import slowest_rank_rows
from common.profiling.layers import Samples, layer_rows, split_fused
from coordinator.planner.profile import Profile


def test_timing_repeats_fill_target_within_bounds() -> None:
    t = Timing(warmup=1, min_repeats=3, max_repeats=10, target_s=0.1)
    assert t.repeats_for(1.0) == 3
    assert t.repeats_for(0.02) == 6
    assert t.repeats_for(1e-6) == 10
    with pytest.raises(ValueError):
        Timing(min_repeats=5, max_repeats=2)


def test_grid_rejects_bad_axes_and_fits_context() -> None:
    with pytest.raises(ValueError, match="increasing"):
        Grid(enc_batches=(4, 2))
    with pytest.raises(ValueError, match="token_cap"):
        Grid(token_cap=16)
    fitted = Grid.full().fit_to(256)
    assert max(fitted.enc_seqs) == 256 and max(fitted.dec_seqs) == 256
    assert all(b * s <= fitted.token_cap for b, s in fitted.enc_cells())
    with pytest.raises(ValueError, match="context"):
        Grid(dec_seqs=(64,), enc_seqs=(64,), token_cap=64).fit_to(32)


def test_grid_round_trips_through_json() -> None:
    grid = Grid.quick()
    assert Grid.from_json(grid.to_json()) == grid


def _samples(grid: Grid) -> Samples:
    """Synthetic cells: attention linear in batch (as the engine's per-sequence loop)."""
    out = Samples()
    for b, s in grid.enc_cells():
        out.enc[(b, s)] = {"attn": 1e-4 + 2e-6 * b * s, "rest": 1e-5 * b * s, "embed": 1e-6,
                           "overhead": 1e-5}
    for b, s in grid.dec_cells():
        out.dec[(b, s)] = {"attn": 1e-6 * b * s, "rest": 1e-4 + 1e-5 * b, "embed": 1e-6,
                           "overhead": 1e-5}
    out.lm_head = {b: 2e-4 * b for b in grid.dec_batches}
    return out


def test_rows_form_full_grids_and_extrapolate_only_past_the_token_cap() -> None:
    grid = Grid(enc_batches=(1, 2, 4, 8), enc_seqs=(16, 64), dec_batches=(1, 4),
                dec_seqs=(16, 64), token_cap=128)
    rows = layer_rows(_samples(grid), grid, tp=1)
    attn = {(r["batch"], r["seq_len"]): r for r in rows if r["op"] == "enc_layer_attn"}
    assert set(attn) == {(b, s) for b in (1, 2, 4, 8) for s in (16, 64)}
    extrapolated = {k for k, r in attn.items() if "extrapolated" in r}
    assert extrapolated == {(4, 64), (8, 64)}
    # linear in batch from (1, 64) and (2, 64): slope 2e-6 * 64 per sequence
    assert attn[(8, 64)]["time_s"] == pytest.approx(1e-4 + 2e-6 * 8 * 64)
    meta = {"device": "cpu", "dtype": "bfloat16", "torch_version": "x", "num_threads": 1,
            "model": ModelConfig.preset("tiny-llama").to_dict(), "date": "d",
            "source": "measured"}
    profile = Profile(meta=meta, rows=rows)
    assert profile.attn("enc", 1, 8, 64) == pytest.approx(1e-4 + 2e-6 * 8 * 64)
    assert profile.rest("dec", 1, 4) == pytest.approx(1e-4 + 4e-5)
    assert profile.op("lm_head", 1, 4) == pytest.approx(8e-4)


def test_slowest_rank_wins() -> None:
    row = {"op": "allreduce", "tp": 2, "batch": 0, "seq_len": 0, "tokens": 0, "bytes": 8}
    merged = slowest_rank_rows([[row | {"time_s": 1.0}], [row | {"time_s": 3.0}]])
    assert [r["time_s"] for r in merged] == [3.0]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"tp_sizes": (3,)}, r"valid TP degrees for this model: \[1, 2, 4\]"),
    ({"dtype": "float16"}, "float16"),
    ({"device": "cuda"}, "not supported"),
    ({"model": "no-such-model"}, "neither a model preset"),
])
def test_bad_arguments_fail_before_any_process_starts(kwargs: dict, match: str) -> None:
    args = {"model": "tiny-llama"} | kwargs
    with pytest.raises(ValueError, match=match):
        measure_profile(**args, quick=True, progress=False)


def test_fused_decode_layers_are_split_by_context() -> None:
    """The engine's fused decode layer fires no attention hook: attention = the part of the
    layer that grows with the context (a line per batch), rest = its intercept."""
    cells = {(b, s): {"attn": float("nan"), "layer": 2e-4 + 1e-5 * b + 1e-7 * b * s + 3e-6,
                      "allreduce": 3e-6, "rest": float("nan")}
             for b in (1, 4) for s in (16, 64, 256)}
    split_fused(cells)
    for (b, s), c in cells.items():
        assert c["attn"] == pytest.approx(1e-7 * b * s, rel=1e-6)
        assert c["rest"] == pytest.approx(2e-4 + 1e-5 * b, rel=1e-6)
    with pytest.raises(RuntimeError, match="two contexts"):
        split_fused({(1, 16): {"attn": float("nan"), "layer": 1e-4, "allreduce": 0.0}})
