"""The grid is measured in several sweeps (forward, then backward) and each cell keeps its
smallest median: a load burst during one sweep on a shared machine (it made the SmolLM2
profile of 21:02 read encode batches 8-16 43% slower than the one of 15:44, on the same
engine, and the planner then picked B_E = 1) does not reach the profile unless it hits the
same cell in every sweep."""

from __future__ import annotations

from typing import Any

import pytest

from common.models.config import ModelConfig
from common.profiling import layers
from common.profiling.grid import Grid


class Progress:
    def __init__(self) -> None:
        self.labels: list[str] = []

    def advance(self, label: str) -> None:
        self.labels.append(label)


def test_each_cell_keeps_its_fastest_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    grid = Grid(enc_batches=(1, 2), enc_seqs=(4,), dec_batches=(1,), dec_seqs=(16,),
                token_cap=8, sweeps=2)
    order: list[tuple[str, int, int]] = []
    burst = {("enc", 2, 4): 0, ("dec", 1, 16): 1}  # the sweep in which a cell is slowed

    def cell(kind: str) -> Any:
        def run(_stage: Any, _cfg: Any, b: int, s: int, *_a: Any) -> dict[str, float]:
            sweep = sum(1 for o in order if o == (kind, b, s))
            order.append((kind, b, s))
            slow = 10.0 if burst.get((kind, b, s)) == sweep else 1.0
            return {"attn": slow * b * s, "rest": slow * b, "lm_head": slow * b}
        return run

    monkeypatch.setattr(layers, "decoder_only_stages", lambda *a: ("stage", "head"))
    monkeypatch.setattr(layers, "_encode_cell", cell("enc"))
    monkeypatch.setattr(layers, "_decode_cell", cell("dec"))
    progress = Progress()
    out = layers.measure_layers(ModelConfig.preset("tiny-llama"), type("T", (), {"tp_size": 1}),
                                grid, "bfloat16", "cpu", None, progress)  # type: ignore[arg-type]
    assert out.enc == {(1, 4): {"attn": 4.0, "rest": 1.0, "lm_head": 1.0},
                       (2, 4): {"attn": 8.0, "rest": 2.0, "lm_head": 2.0}}
    assert out.dec[(1, 16)] == {"attn": 16.0, "rest": 1.0, "lm_head": 1.0}
    assert out.lm_head == {1: 1.0}
    # the second sweep runs backward: the cell measured last is measured again first
    assert order[:3] == [("enc", 1, 4), ("enc", 2, 4), ("dec", 1, 16)]
    assert order[4:] == [("dec", 1, 16), ("dec", 1, 16), ("enc", 2, 4), ("enc", 1, 4)]
    assert len(progress.labels) == layers.num_units(grid) == 8


def test_sweeps_are_validated_and_the_quick_grid_measures_once() -> None:
    with pytest.raises(ValueError, match="sweeps"):
        Grid(sweeps=0)
    assert Grid.quick().sweeps == 1 and Grid.full().sweeps == 2
    assert Grid.from_json(Grid.full().to_json()) == Grid.full()
