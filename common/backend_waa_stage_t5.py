"""T5 in a staged WAA plan (coordinator/waa_layout.py): how its encoder and decoder stages are
built, and what differs from a decoder-only model's stages.

    encoder stage [a, b) of the encoder stack   encoder layers only; the LAST encoder stage
                    also applies the final norm and holds every decoder layer's cross-attention
                    K/V projections (``cross_kv_only``: no other decoder weight), so its encode
                    pass writes each request's cross K/V for all decoder layers; it samples no
                    token (``emits_first_token`` False) and exports ``cross_k``/``cross_v``
    decoder stage [c, d) of the decoder stack   decoder layers only, no encoder layer; a
                    request joins with the cross K/V of [c, d) and an empty self-attention KV,
                    and its first decode pass feeds the decoder start token: the last stage
                    samples output position 0 (``first_position``)

Stages before the last encoder stage hold no KV at all: their cache is an empty placeholder
(no layers, no tensors), so the stream bookkeeping of ``EngineStageBackend`` runs unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from common.backend_engine import _check_dtype
from common.backend_stage import StageBackendBase
from common.engine.kv_cache import KVCache
from common.engine.sampling import Sampler
from common.engine.tp import TPGroup
from common.models.registry import ModelSpec, build_stage

Range = tuple[int, int]
CROSS_NAMES = ("cross_k", "cross_v")  # what a T5 encoder stage hands on
SELF_NAMES = ("k", "v")  # what a decoder-only encoder stage hands on


def init_t5_stage(backend: Any, spec: ModelSpec, side: str, layer_range: Range | None,
                  dtype: str, device: str, tp: TPGroup | None) -> None:
    """Set up ``backend`` (an EngineStageBackend subclass) as one side's T5 stage: the same
    attributes ``EngineStageBackend.__init__`` sets, over the stage described above."""
    _check_dtype(dtype)
    cfg = spec.config
    total = cfg.num_encoder_layers if side == "encoder" else cfg.num_layers
    lo, hi = layer_range if layer_range is not None else (0, total)
    if not 0 <= lo < hi <= total:
        raise ValueError(f"a T5 {side} stage holds layers within [0, {total}] of its stack, "
                         f"got {layer_range}")
    StageBackendBase.__init__(backend, cfg, is_first=lo == 0, is_last=hi == total)
    if side == "encoder":
        ranges = {"encoder_layer_range": (lo, hi), "cross_kv_only": True,
                  "layer_range": (0, cfg.num_layers) if hi == total else (0, 0)}
    else:
        ranges = {"encoder_layer_range": (0, 0), "layer_range": (lo, hi)}
    backend.two_laps, backend.encoder_out_onward = False, False
    backend.stage = build_stage(cfg, tp=tp or TPGroup.single(), weights=spec.weights,
                                dtype=dtype, device=device, **ranges)
    backend.device = torch.device(device)
    backend.sampler = Sampler()
    template = backend.stage.cache
    backend._template = template if template is not None else _no_kv(backend.stage.dtype,
                                                                      device)
    backend._caches, backend._stream_of = {}, {}
    backend.kv_names = CROSS_NAMES
    backend.emits_first_token = False
    backend.first_position = 0


def _no_kv(dtype: torch.dtype, device: str) -> KVCache:
    """The cache of a stage that keeps no KV (T5 encoder layers only)."""
    return KVCache(layer_start=0, layer_end=0, head_start=0, head_end=0, num_kv_heads=0,
                   head_dim=0, dtype=dtype, device=device, names=(), fixed_names=(),
                   max_slots=1, transposed_names=())
