"""Per-layer costs of the real engine on one TP rank: the encode and decode cells of the grid.

Every cell runs the stage's real ``encode``/``decode`` on a ragged batch of ``batch`` equal
sequences, and ``ProbedStage.split`` cuts each pass into the profile's ops:

    encode (batch, seq_len): ``batch`` prompts of ``seq_len`` tokens (T5: encoder inputs)
    decode (batch, seq_len): one new token per sequence attending to ``seq_len`` keys in all
        (decoder-only: seq_len - 1 cached + itself; T5: seq_len // 2 self-attention keys
        including itself + the rest as encoder keys for cross-attention, since the planner
        asks for a T5 decode step by its total context, input + generated)

KV caches are filled by setting lengths (the cache is preallocated and zeroed; attention cost
does not depend on the values), so a decode cell at 2048 tokens needs no 2048-token prefill.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from common.engine.batch import StageBatch
from common.engine.kv_cache import FIXED
from common.models.config import ModelConfig
from common.profiling.grid import Grid
from common.profiling.stages import (
    ProbedStage,
    decoder_only_stages,
    random_ids,
    t5_stages,
)
from common.profiling.timing import Group, ProgressFile, TimedTP, now, run_cell

_ids = itertools.count()


@dataclass
class Samples:
    """Medians per cell, gathered before they become rows."""

    enc: dict[tuple[int, int], dict[str, float]] = field(default_factory=dict)
    dec: dict[tuple[int, int], dict[str, float]] = field(default_factory=dict)
    lm_head: dict[int, float] = field(default_factory=dict)


def _timed(ps: ProbedStage, run: Callable[[], Any]) -> Callable[[], dict[str, float]]:
    def step() -> dict[str, float]:
        ps.begin()
        t0 = now()
        run()
        return ps.split(now() - t0).as_dict()

    return step


def _input(ps: ProbedStage, cfg: ModelConfig, seq_lens: list[int], device: str,
           req_ids: list[str]) -> StageBatch:
    """Token ids for a stage that embeds, otherwise random hidden states."""
    total = sum(seq_lens)
    if ps.num_embeds:
        return StageBatch(req_ids=req_ids, seq_lens=seq_lens,
                          input_ids=random_ids(cfg, total, device, seed=total))
    hidden = torch.randn(total, cfg.hidden_size).to(device=device, dtype=ps.stage.dtype)
    return StageBatch(req_ids=req_ids, seq_lens=seq_lens, hidden=hidden)


def _encode_cell(ps: ProbedStage, cfg: ModelConfig, batch: int, seq_len: int, device: str,
                 grid: Grid, group: Group) -> dict[str, float]:
    """Fresh requests every pass (encode adds them to the cache); inputs built untimed."""
    live: list[StageBatch] = []

    def reset() -> None:
        cache = getattr(ps.stage, "cache", None)
        for r in live[0].req_ids if live else []:
            if cache is not None and r in cache:
                cache.free(r)
        req_ids = [f"e{next(_ids)}" for _ in range(batch)]
        live[:] = [_input(ps, cfg, [seq_len] * batch, device, req_ids)]

    out = run_cell(_timed(ps, lambda: ps.stage.encode(live[0])), grid.timing, group, reset)
    reset()
    return out


def _decode_lengths(cfg: ModelConfig, seq_len: int) -> tuple[int, int]:
    """(cached self-attention tokens, encoder tokens) of a decode cell with seq_len keys."""
    if cfg.is_encoder_decoder:
        return seq_len // 2 - 1, seq_len - seq_len // 2
    return seq_len - 1, 0


def _decode_cell(ps: ProbedStage, cfg: ModelConfig, batch: int, seq_len: int, device: str,
                 grid: Grid, group: Group) -> dict[str, float]:
    cache = ps.stage.cache
    req_ids = [f"d{next(_ids)}" for _ in range(batch)]
    cached, cross = _decode_lengths(cfg, seq_len)
    for r in req_ids:
        cache.add(r)
        if cross:
            cache.set_length(r, cross, FIXED)

    def reset() -> None:
        for r in req_ids:
            cache.set_length(r, cached)

    batch_in = _input(ps, cfg, [1] * batch, device, req_ids)
    try:
        return run_cell(_timed(ps, lambda: ps.stage.decode(batch_in)), grid.timing, group, reset)
    finally:
        for r in req_ids:
            cache.free(r)
        cache.compact()


def measure_layers(cfg: ModelConfig, tp: TimedTP, grid: Grid, dtype: str, device: str,
                   group: Group, progress: ProgressFile) -> Samples:
    """Run every cell of ``grid`` on this rank (all ranks of a TP group run in lockstep),
    ``grid.sweeps`` times, forward then backward; each cell keeps its smallest median."""
    if cfg.is_encoder_decoder:
        enc_stage, dec_stage, head_stage = t5_stages(cfg, tp, dtype, device)
    else:
        enc_stage, head_stage = decoder_only_stages(cfg, tp, dtype, device)
        dec_stage = enc_stage
    cells: list[tuple[str, Any]] = ([("enc", c) for c in grid.enc_cells()]
                                    + [("dec", c) for c in grid.dec_cells()]
                                    + [("lm_head", b) for b in grid.dec_batches])
    out = Samples()
    for sweep in range(grid.sweeps):
        for kind, key in cells if sweep % 2 == 0 else cells[::-1]:
            if kind == "lm_head":
                got = _decode_cell(head_stage, cfg, key, grid.dec_seqs[0], device, grid,
                                   group)["lm_head"]
                out.lm_head[key] = min(got, out.lm_head.get(key, got))
            else:
                stage, run = (enc_stage, _encode_cell) if kind == "enc" else (dec_stage,
                                                                                _decode_cell)
                got = run(stage, cfg, key[0], key[1], device, grid, group)
                table = out.enc if kind == "enc" else out.dec
                old = table.get(key, got)
                table[key] = {name: min(t, old[name]) for name, t in got.items()}
            label = "lm_head batch" if kind == "lm_head" else f"{kind}ode batch, seq_len"
            progress.advance(label=f"tp={tp.tp_size} sweep {sweep + 1}/{grid.sweeps} "
                                   f"{label}={key}")
    return out


def num_units(grid: Grid) -> int:
    """Progress units of ``measure_layers`` (one per cell and sweep)."""
    return (len(grid.enc_cells()) + len(grid.dec_cells()) + len(grid.dec_batches)) * grid.sweeps


# ---- samples -> profile rows --------------------------------------------------------------
def _row(op: str, tp: int, time_s: float, *, batch: int = 0, seq_len: int = 0, tokens: int = 0,
         nbytes: int = 0) -> dict[str, Any]:
    return {"op": op, "tp": tp, "batch": batch, "seq_len": seq_len, "tokens": tokens,
            "bytes": nbytes, "time_s": time_s}


def _by_size(pairs: list[tuple[int, float]]) -> list[tuple[int, float]]:
    groups: dict[int, list[float]] = defaultdict(list)
    for size, t in pairs:
        groups[size].append(t)
    return sorted((size, statistics.median(ts)) for size, ts in groups.items())


def _enc_attn_rows(samples: Samples, grid: Grid, tp: int) -> list[dict[str, Any]]:
    rows = []
    for s in grid.enc_seqs:
        measured = sorted(b for b in grid.enc_batches if (b, s) in samples.enc)
        for b in grid.enc_batches:
            if (b, s) in samples.enc:
                rows.append(_row("enc_layer_attn", tp, samples.enc[(b, s)]["attn"], batch=b,
                                 seq_len=s))
                continue
            rows.append(_row("enc_layer_attn", tp, _extrapolate(samples, measured, s, b),
                             batch=b, seq_len=s) | {"extrapolated": "linear in batch"})
    return rows


def _extrapolate(samples: Samples, measured: list[int], s: int, b: int) -> float:
    top = samples.enc[(measured[-1], s)]["attn"]
    if len(measured) == 1:
        return top * b / measured[-1]
    low = samples.enc[(measured[-2], s)]["attn"]
    slope = max((top - low) / (measured[-1] - measured[-2]), 0.0)
    return top + slope * (b - measured[-1])


def split_fused(cells: dict[tuple[int, int], dict[str, float]]) -> None:
    """Attention / rest of decode cells whose layer ran fused (attn NaN: no hook inside).

    A decode step's attention reads ``seq_len`` cached keys: linear in the context, while
    the rest of the layer does not depend on it. Per batch, a least-squares line of the
    layer time (minus its all-reduces) over the measured contexts gives the rest as its
    intercept and the attention as the remainder at each context (clipped at 0). Needs two
    contexts per batch (every grid has them)."""
    by_batch: dict[int, list[int]] = defaultdict(list)
    for (b, s), c in cells.items():
        if math.isnan(c["attn"]):
            by_batch[b].append(s)
    for b, seqs in by_batch.items():
        if len(seqs) < 2:
            raise RuntimeError(f"a fused decode layer needs two contexts per batch to split "
                               f"attention from the rest; batch {b} has {seqs}")
        xs = [float(s) for s in seqs]
        ys = [cells[(b, s)]["layer"] - cells[(b, s)]["allreduce"] for s in seqs]
        slope, icpt = statistics.linear_regression(xs, ys)
        rest = max(icpt, 0.0) if slope >= 0 else statistics.median(ys)
        for s, y in zip(seqs, ys, strict=True):
            cells[(b, s)]["attn"] = max(y - rest, 0.0)
            cells[(b, s)]["rest"] = y - cells[(b, s)]["attn"]


def layer_rows(samples: Samples, grid: Grid, tp: int) -> list[dict[str, Any]]:
    """The profile rows of one rank: attention grids, rest/embed/lm_head by tokens."""
    if any(math.isnan(c["attn"]) for c in samples.enc.values()):
        raise RuntimeError("profiling hooks inside the encode layer did not fire: the "
                           "engine's module layout changed; update common/profiling/stages.py")
    split_fused(samples.dec)
    rows = _enc_attn_rows(samples, grid, tp)
    rows += [_row("dec_layer_attn", tp, c["attn"], batch=b, seq_len=s)
             for (b, s), c in samples.dec.items()]
    enc_rest = _by_size([(b * s, c["rest"]) for (b, s), c in samples.enc.items()])
    rows += [_row("enc_layer_rest", tp, t, tokens=n) for n, t in enc_rest]
    dec_rest = _by_size([(b, c["rest"]) for (b, _s), c in samples.dec.items()])
    rows += [_row("dec_layer_rest", tp, t, tokens=n) for n, t in dec_rest]
    embed = _by_size([(b * s, c["embed"]) for (b, s), c in samples.enc.items()]
                     + [(b, c["embed"]) for (b, _s), c in samples.dec.items()])
    rows += [_row("embed", tp, t, tokens=n) for n, t in embed]
    rows += [_row("lm_head", tp, t, tokens=b) for b, t in sorted(samples.lm_head.items())]
    return rows


def overhead_rows(samples: Samples, tp: int) -> list[dict[str, Any]]:
    """Per-pass overhead of a one-layer stage (not a profile op; kept in the metadata)."""
    return ([{"phase": "encode", "tp": tp, "batch": b, "seq_len": s, "time_s": c["overhead"]}
             for (b, s), c in samples.enc.items()]
            + [{"phase": "decode", "tp": tp, "batch": b, "seq_len": s, "time_s": c["overhead"]}
               for (b, s), c in samples.dec.items()])
