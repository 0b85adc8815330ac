"""Who holds which layers: stages (a TP group of workers and a layer range) and pipelines.

Partial tensor parallelism: for a TP degree ``t`` and ``num_tp_workers`` k (a multiple of t),
k workers form k/t TP stages and the other workers run alone (tp 1). More TP workers means a
shorter pipeline: lower latency, usually lower throughput (all-reduce overhead). Layers are
split in proportion to each stage's speed so that the pipeline is balanced.

In WAA the workers are first split into an encoder group and a decoder group; TP stages go to
the decoder group first (it runs many more steps per request), then to the encoder group.
"""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.planner.profile import Profile


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: ``tp`` workers sharing ``enc_layers`` and ``dec_layers`` [lo, hi)."""

    tp: int
    enc_layers: tuple[int, int]
    dec_layers: tuple[int, int]
    first: bool
    last: bool

    @property
    def num_enc(self) -> int:
        return self.enc_layers[1] - self.enc_layers[0]

    @property
    def num_dec(self) -> int:
        return self.dec_layers[1] - self.dec_layers[0]


Pipeline = tuple[Stage, ...]


def tp_stage_sizes(num_workers: int, tp: int, num_tp_workers: int) -> list[int]:
    """Per-stage tp sizes: TP stages first, then single workers."""
    if tp < 1 or num_tp_workers % tp or not 0 <= num_tp_workers <= num_workers:
        raise ValueError(f"{num_tp_workers} TP workers at tp={tp} do not fit {num_workers} workers")
    return [tp] * (num_tp_workers // tp) + [1] * (num_workers - num_tp_workers)


def _split(total: int, weights: list[float]) -> list[int]:
    """Largest-remainder split of ``total`` layers, at least one per stage when possible."""
    if total == 0:
        return [0] * len(weights)
    floor_min = 1 if total >= len(weights) else 0
    weight_sum = sum(weights)
    share = [total * w / weight_sum for w in weights]
    counts = [max(int(s), floor_min) for s in share]
    # one layer at a time from/to the stage furthest over/under its share (first on ties)
    for _ in range(sum(counts) - total):
        keys = [c - s for c, s in zip(counts, share, strict=True)]
        counts[keys.index(max(keys))] -= 1
    for _ in range(total - sum(counts)):
        keys = [s - c for c, s in zip(counts, share, strict=True)]
        counts[keys.index(max(keys))] += 1
    return counts


def _ranges(counts: list[int]) -> list[tuple[int, int]]:
    out, lo = [], 0
    for c in counts:
        out.append((lo, lo + c))
        lo += c
    return out


def stage_speed(profile: Profile, tp: int) -> float:
    """Layers per second of a decode step at a mid-sized batch: the balancing weight
    (memoised per tp: every pipeline the search builds asks it for each stage)."""
    cache = profile.__dict__.setdefault("_stage_speed", {})
    if tp not in cache:
        cache[tp] = 1.0 / float(profile.rest("dec", tp, 64) + profile.attn("dec", tp, 64, 512))
    return cache[tp]


def build_pipeline(profile: Profile, tps: list[int], *, enc: bool, dec: bool) -> Pipeline | None:
    key = (tuple(tps), enc, dec)
    cache = profile.__dict__.setdefault("_pipelines", {})
    if key not in cache:
        cache[key] = _build_pipeline(profile, tps, enc=enc, dec=dec)
    return cache[key]


def _build_pipeline(profile: Profile, tps: list[int], *, enc: bool, dec: bool) -> Pipeline | None:
    """A pipeline over ``tps`` holding the encoder layers (if ``enc``) and decoder layers (if
    ``dec``); None when there are more stages than layers."""
    model = profile.model
    num_enc = model.num_encoder_layers if enc else 0
    num_dec = model.num_layers if dec or (enc and not model.is_encoder_decoder) else 0
    if len(tps) > max(num_enc, num_dec) or not tps:
        return None
    speeds = [stage_speed(profile, tp) for tp in tps]
    enc_r = _ranges(_split(num_enc, speeds))
    dec_r = _ranges(_split(num_dec, speeds))
    last = len(tps) - 1
    return tuple(Stage(tp, enc_r[i], dec_r[i], i == 0, i == last) for i, tp in enumerate(tps))


def split_tp_workers(num_enc: int, num_dec: int, tp: int, num_tp_workers: int
                     ) -> tuple[list[int], list[int]] | None:
    """Encoder and decoder stage tp sizes for WAA; None if the TP workers do not fit."""
    k_dec = min(num_tp_workers, (num_dec // tp) * tp)
    k_enc = min(num_tp_workers - k_dec, (num_enc // tp) * tp)
    if k_dec + k_enc != num_tp_workers:
        return None
    return (tp_stage_sizes(num_enc, tp, k_enc), tp_stage_sizes(num_dec, tp, k_dec))
