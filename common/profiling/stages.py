"""One-layer stages of the real model, with probes on the modules whose boundaries we time.

Which stages (random weights, built by the engine's own ``build_stage`` for this TP rank):

    decoder-only  first = layers [0, 1)  (embedding + one layer: the encode and decode cells)
                  last  = layers [n-1, n) (one layer + final norm + LM head: the lm_head cells)
    T5            encoder = encoder layers [0, 1) (embedding + one encoder layer)
                  decoder = decoder layers [0, 1) (embedding + one decoder layer)
                  last    = decoder layers [n-1, n) (+ final norm + LM head)

``PassTimes`` splits one pass into the planner's ops (see ``common.profiling.timing``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from common.models.config import ModelConfig
from common.models.registry import build_stage
from common.profiling.timing import Probe, TimedTP


@dataclass(frozen=True)
class PassTimes:
    """Seconds of one pass, split the way the profile rows are."""

    total: float
    embed: float
    layer: float  # the whole layer including its all-reduces
    attn: float  # attention core(s) of the layer
    allreduce: float  # all-reduce time inside the layer
    lm_head: float

    @property
    def rest(self) -> float:
        return self.layer - self.attn - self.allreduce

    @property
    def overhead(self) -> float:
        """Per-pass work outside embed, layer and head (cache bookkeeping, masks, RoPE
        tables, T5 position bias): paid once per stage pass, not per layer."""
        return self.total - self.embed - self.layer - self.lm_head

    def as_dict(self) -> dict[str, float]:
        return {"total": self.total, "embed": self.embed, "layer": self.layer,
                "attn": self.attn, "allreduce": self.allreduce, "lm_head": self.lm_head,
                "rest": self.rest, "overhead": self.overhead}


class ProbedStage:
    """A built stage plus the probe wiring for its single layer, embeddings and head."""

    def __init__(self, stage: nn.Module, tp: TimedTP, layer: nn.Module,
                 attn_pairs: list[tuple[nn.Module, nn.Module]], embeds: list[nn.Module],
                 head: tuple[nn.Module, nn.Module] | None) -> None:
        self.stage, self.tp, self.probe = stage, tp, Probe()
        self.probe.watch("layer", layer)
        self.num_attn = len(attn_pairs)
        for i, (proj_in, proj_out) in enumerate(attn_pairs):
            self.probe.watch(f"in{i}", proj_in)
            self.probe.watch(f"out{i}", proj_out)
        self.num_embeds = len(embeds)
        for i, module in enumerate(embeds):
            self.probe.watch(f"embed{i}", module)
        self.has_head = head is not None
        if head is not None:
            self.probe.watch("norm", head[0])
            self.probe.watch("lm_head", head[1])

    def begin(self) -> None:
        self.probe.clear()
        self.tp.log.clear()

    def split(self, total: float) -> PassTimes:
        p = self.probe
        layer = p.span(("layer", "pre"), ("layer", "post"))
        if self.num_attn and ("in0", "post") not in p.marks:
            # a fused layer (the engine's one-C-call decode layer, common/engine/native_layer)
            # runs no attention submodule: NaN here, split by context in layers.split_fused
            attn = float("nan")
        else:
            attn = sum(p.span((f"in{i}", "post"), (f"out{i}", "pre"))
                       for i in range(self.num_attn))
        embed = sum(p.span((f"embed{i}", "pre"), (f"embed{i}", "post"))
                    for i in range(self.num_embeds))
        head = p.span(("norm", "pre"), ("lm_head", "post")) if self.has_head else 0.0
        ar = self.tp.reduced_within(p.marks[("layer", "pre")], p.marks[("layer", "post")])
        return PassTimes(total=total, embed=embed, layer=layer, attn=attn, allreduce=ar,
                         lm_head=head)


def _build(cfg: ModelConfig, tp: TimedTP, dtype: str, device: str, **ranges: object
           ) -> nn.Module:
    return build_stage(cfg, tp=tp, device=device, dtype=dtype, **ranges)


def decoder_only_stages(cfg: ModelConfig, tp: TimedTP, dtype: str, device: str
                        ) -> tuple[ProbedStage, ProbedStage]:
    """(first stage for encode/decode cells, last stage for the LM head)."""
    n = cfg.num_layers
    first = _build(cfg, tp, dtype, device, layer_range=(0, 1))
    last = first if n == 1 else _build(cfg, tp, dtype, device, layer_range=(n - 1, n))

    def probed(stage: nn.Module) -> ProbedStage:
        layer = stage.layers[0]
        embeds = [m for m in (stage.embed, stage.pos_embed) if m is not None]
        head = (stage.norm, stage.lm_head) if stage.lm_head is not None else None
        return ProbedStage(stage, tp, layer, [(layer.attn.qkv, layer.attn.o)], embeds, head)

    a = probed(first)
    return a, (a if last is first else probed(last))


def t5_stages(cfg: ModelConfig, tp: TimedTP, dtype: str, device: str
              ) -> tuple[ProbedStage, ProbedStage, ProbedStage]:
    """(encoder stage, decoder stage, last decoder stage for the LM head)."""
    n = cfg.num_layers
    enc = _build(cfg, tp, dtype, device, encoder_layer_range=(0, 1), layer_range=(0, 0))
    dec = _build(cfg, tp, dtype, device, encoder_layer_range=(0, 0), layer_range=(0, 1))
    last = dec if n == 1 else _build(cfg, tp, dtype, device, encoder_layer_range=(0, 0),
                                     layer_range=(n - 1, n))
    e_layer = enc.encoder_layers[0]
    e = ProbedStage(enc, tp, e_layer, [(e_layer.attn.qkv, e_layer.attn.o)], [enc.embed], None)

    def probed(stage: nn.Module) -> ProbedStage:
        layer = stage.decoder_layers[0]
        pairs = [(layer.self_attn.qkv, layer.self_attn.o), (layer.cross_attn.q, layer.cross_attn.o)]
        embeds = [stage.embed] if stage.embed is not None else []
        head = (stage.decoder_norm, stage.lm_head) if stage.lm_head is not None else None
        return ProbedStage(stage, tp, layer, pairs, embeds, head)

    d = probed(dec)
    return e, d, (d if last is dec else probed(last))


def random_ids(cfg: ModelConfig, count: int, device: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (count,), generator=gen).to(device)
