"""Measurement grids: which (batch, seq_len) cells, token counts and byte sizes to time.

Why these grids: the planner interpolates piecewise-linearly between grid points and
extrapolates along the last segment, so the grids only need points where costs bend
(small sizes, where fixed overheads dominate) and a few far apart where they are affine.
Geometric steps of 2 (4 for bytes) do that in minutes for a 135M model on one core.

Prefill is the expensive half: ``batch x seq_len`` tokens through a layer. Cells above
``token_cap`` tokens are not run; their attention time is extrapolated linearly in batch from
the two largest measured batches of the same ``seq_len``. That is exact for this engine, whose
prefill attention loops over the sequences of a batch one by one (decoder-only ``_prefill``,
T5 ``SelfAttention.encode``); such rows carry ``"extrapolated": "linear in batch"``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

FULL_ENC_BATCHES = (1, 2, 4, 8, 16, 32, 64)
# 72 and 96: the native bf16 linears take up to 64 rows, so a prefill's cost steps up just
# past 64 tokens; without points there the planner under-priced 65-127-token prompts by 20-50%
FULL_ENC_SEQS = (1, 4, 16, 32, 64, 72, 96, 128, 256, 512, 1024, 2048)
FULL_DEC_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
FULL_DEC_SEQS = (16, 32, 64, 128, 256, 512, 1024, 2048)
FULL_ALLREDUCE_BYTES = tuple(4**k for k in range(4, 13))  # 256 B .. 16 MiB
FULL_TRANSPORT_BYTES = tuple(4**k for k in range(5, 14))  # 1 KiB .. 64 MiB


@dataclass(frozen=True)
class Timing:
    """Warm-up and repeat policy of one cell: ``warmup`` untimed passes, then enough timed
    passes to fill ``target_s`` (at least ``min_repeats``, at most ``max_repeats``); the
    median is kept."""

    warmup: int = 2
    min_repeats: int = 3
    max_repeats: int = 20
    target_s: float = 0.25

    def __post_init__(self) -> None:
        if self.warmup < 1:
            raise ValueError("Timing.warmup must be >= 1 (the first pass of a shape is slow)")
        if not 1 <= self.min_repeats <= self.max_repeats:
            raise ValueError("Timing needs 1 <= min_repeats <= max_repeats")
        if self.target_s <= 0:
            raise ValueError("Timing.target_s must be > 0")

    def repeats_for(self, first_s: float) -> int:
        """How many timed passes fill ``target_s`` when one pass took ``first_s``."""
        wanted = int(self.target_s / max(first_s, 1e-6)) + 1
        return min(max(wanted, self.min_repeats), self.max_repeats)


@dataclass(frozen=True)
class Grid:
    enc_batches: tuple[int, ...] = FULL_ENC_BATCHES
    enc_seqs: tuple[int, ...] = FULL_ENC_SEQS
    dec_batches: tuple[int, ...] = FULL_DEC_BATCHES
    dec_seqs: tuple[int, ...] = FULL_DEC_SEQS
    token_cap: int = 4096
    allreduce_bytes: tuple[int, ...] = FULL_ALLREDUCE_BYTES
    transport_bytes: tuple[int, ...] = FULL_TRANSPORT_BYTES
    timing: Timing = Timing()
    # the whole grid is measured this many times, alternately forward and backward, and each
    # cell keeps its smallest median: a load burst on a shared machine slows the cells it
    # overlaps in one sweep, not the same cells in the next (measure_layers)
    sweeps: int = 2

    def __post_init__(self) -> None:
        if self.sweeps < 1:
            raise ValueError(f"Grid.sweeps must be >= 1, got {self.sweeps}")
        for name in ("enc_batches", "enc_seqs", "dec_batches", "dec_seqs", "allreduce_bytes",
                     "transport_bytes"):
            values = getattr(self, name)
            if not values or list(values) != sorted(set(values)) or values[0] < 1:
                raise ValueError(f"Grid.{name} must be increasing positive integers, "
                                 f"got {values!r}")
        if self.dec_seqs[0] < 2:
            raise ValueError("Grid.dec_seqs must start at >= 2 (a decode step attends to its "
                             "cached context plus the new token)")
        if self.token_cap < max(self.enc_seqs):
            raise ValueError(f"Grid.token_cap={self.token_cap} must be >= the longest "
                             f"enc_seqs entry {max(self.enc_seqs)} so every seq_len is measured "
                             "at batch 1")

    @staticmethod
    def full() -> Grid:
        return Grid()

    @staticmethod
    def quick() -> Grid:
        """Seconds, for tests: two or three points per axis."""
        return Grid(enc_batches=(1, 2), enc_seqs=(4, 16), dec_batches=(1, 2, 4),
                    dec_seqs=(16, 32), token_cap=32, allreduce_bytes=(1024, 65536),
                    transport_bytes=(1024, 65536),
                    timing=Timing(warmup=2, min_repeats=9, max_repeats=40, target_s=0.05),
                    sweeps=1)

    def fit_to(self, max_position: int) -> Grid:
        """Drop sequence lengths the model cannot hold (a decode cell needs seq_len positions)."""
        enc = tuple(s for s in self.enc_seqs if s <= max_position)
        dec = tuple(s for s in self.dec_seqs if s <= max_position)
        if not enc or not dec:
            raise ValueError(f"the model's context ({max_position} tokens) is shorter than every "
                             "grid sequence length; pass a grid with shorter enc_seqs/dec_seqs")
        return replace(self, enc_seqs=enc, dec_seqs=dec,
                       token_cap=max(min(self.token_cap, max(self.enc_batches) * max(enc)),
                                     max(enc)))

    def enc_cells(self) -> list[tuple[int, int]]:
        """(batch, seq_len) prefill cells to run: those within ``token_cap``."""
        return [(b, s) for s in self.enc_seqs for b in self.enc_batches
                if b * s <= self.token_cap]

    def dec_cells(self) -> list[tuple[int, int]]:
        return [(b, s) for s in self.dec_seqs for b in self.dec_batches]

    def to_json(self) -> dict[str, Any]:
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}
        out["timing"] = dict(self.timing.__dict__)
        return out

    @staticmethod
    def from_json(data: dict[str, Any]) -> Grid:
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()
                  if k != "timing"}
        return Grid(**fields, timing=Timing(**data["timing"]))
