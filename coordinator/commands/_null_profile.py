"""A profile that describes the null model's costs, so plans made from it predict a null mesh.

The null stage worker sleeps a fixed time per pass (``decode_cost_ms``: any batch, any context;
``encode_cost_ms + encode_cost_ms_per_token x prompt tokens`` for an encode pass), whatever
layers it holds. As profile rows (one layer; the planner multiplies by the stage's layers):

    dec_layer_rest(tokens)  = decode_cost / L          (flat: the batch costs nothing more)
    enc_layer_rest(tokens)  = (encode_cost + per_token x tokens) / L   (affine in tokens)
    attention, embed, lm_head, stage_send, kv_handoff = 0

with L the layers of one stage of an even split. Exact for plans whose stages hold L layers
each (the planner's even split of a uniform-cost model); a stage of other size is mispredicted
in proportion. Used by `exegpt bench adapt` and the adaptation tests: the bound the planner
promises is then a statement about the null mesh, which can be measured.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from common.models.config import ModelConfig

BIG_TOKENS = 1_000_000.0  # the tables' last grid point: exact (affine) up to here
BIG_BYTES = 1e13


@dataclass(frozen=True)
class NullCosts:
    """The null workers' sleep per pass (one stage), in milliseconds."""

    decode_ms: float
    encode_ms: float = 0.0
    encode_ms_per_token: float = 0.0

    def __post_init__(self) -> None:
        if self.decode_ms <= 0 or min(self.encode_ms, self.encode_ms_per_token) < 0:
            raise ValueError("null costs: decode_ms must be > 0, encode costs >= 0")

    def decode_s(self) -> float:
        return self.decode_ms / 1000

    def encode_s(self, tokens: float) -> float:
        return (self.encode_ms + self.encode_ms_per_token * tokens) / 1000


def null_profile_dict(costs: NullCosts, shape: str = "smollm2-135m", stages: int = 2,
                      memory_bytes: float = 16e9) -> dict[str, Any]:
    """The profile JSON (``{"meta", "rows"}``) of ``costs`` for a ``stages``-stage split."""
    model = ModelConfig.preset(shape)
    layers = model.num_layers / stages
    if model.num_encoder_layers or model.num_layers % stages:
        raise ValueError(f"{shape}: a null profile needs a decoder-only model whose layers "
                         f"split evenly over {stages} stages")

    def row(op: str, time_s: float, **size: float) -> dict[str, Any]:
        return {"op": op, "tp": 1, "batch": 0, "seq_len": 0, "tokens": 0, "bytes": 0,
                **size, "time_s": time_s}

    rows = []
    for phase in ("enc", "dec"):
        rows += [row(f"{phase}_layer_attn", 0.0, batch=b, seq_len=s)
                 for b in (1, 4096) for s in (1, 65536)]
    rows += [row("dec_layer_rest", costs.decode_s() / layers, tokens=t) for t in (1, BIG_TOKENS)]
    rows += [row("enc_layer_rest", costs.encode_s(t) / layers, tokens=t) for t in (1, BIG_TOKENS)]
    rows += [row(op, 0.0, tokens=t) for op in ("embed", "lm_head") for t in (1, BIG_TOKENS)]
    rows += [row(op, 0.0, bytes=b) for op in ("stage_send", "kv_handoff") for b in (1, BIG_BYTES)]
    meta = {"device": f"null model ({stages} stages; decode {costs.decode_ms:g} ms, encode "
                      f"{costs.encode_ms:g} ms + {costs.encode_ms_per_token:g} ms/token per "
                      "stage pass)",
            "dtype": "bfloat16", "torch_version": None, "num_threads": 0,
            "model": model.to_dict(), "date": dt.datetime.now(dt.UTC).isoformat(
                timespec="seconds"), "source": "null", "memory_bytes": memory_bytes}
    return {"meta": meta, "rows": rows}
