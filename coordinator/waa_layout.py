"""A staged WAA plan's layout: each encoder and decoder pipeline stage's layers, and which
decoder stages each encoder stage hands KV to (torch-free; coordinator/waa_pipeline.py).

Decoder-only models: both pipelines split the same layers, and encoder stage s hands its
prompt KV of layers [a, b) to every decoder stage overlapping them. T5 (``cross``): the encoder
stages split the encoder stack (``num_encoder_layers``) and the decoder stages the decoder
stack; every decoder layer's cross-attention K/V comes from the FINAL encoder output, so only
the last encoder stage hands KV on (it holds the decoder layers' cross K/V projections, nothing
else of them): each decoder stage gets the cross K/V of its own layers, in one KVHandoff of the
existing format (``cross_k``/``cross_v``, as a whole-model T5 encoder worker's). The decoder
pipeline then samples the first token from the decoder start token (``start_token``), so no
new wire field carries the encoder output to the decoder stages.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.models.config import ModelConfig
from coordinator.config import CoordinatorConfig, parse_ranges
from coordinator.pipeline_driver import _check_cover

Range = tuple[int, int]


@dataclass(frozen=True)
class WaaLayout:
    """Each encoder stage's and each decoder stage's layers, [lo, hi), in pipeline order.
    ``cross``: T5 (encoder stages hold encoder-stack layers; see the module docstring)."""

    encoder: tuple[Range, ...]
    decoder: tuple[Range, ...]
    cross: bool = False
    start_token: int = 0  # T5: what the first decode pass feeds (no token is out yet)
    # each global stage's tp_size (encoder stages first); () = every stage one tp-1 worker.
    # Set by a live re-layout that re-groups TP ranks (coordinator.relayout_tp.WaaTpRelayout)
    tp: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.encoder or not self.decoder:
            raise ValueError("a staged WAA layout needs at least one encoder and one decoder "
                             "stage")
        if self.tp and (len(self.tp) != self.num_stages or any(t < 1 for t in self.tp)):
            raise ValueError(f"a staged WAA layout needs one tp_size >= 1 per stage: "
                             f"{list(self.tp)} for {self.num_stages} stages")

    @property
    def tp_sizes(self) -> tuple[int, ...]:
        """Each global stage's TP group size (encoder stages first)."""
        return self.tp or (1,) * self.num_stages

    @property
    def num_workers(self) -> int:
        """Stage worker processes the layout occupies (every rank of every stage)."""
        return sum(self.tp_sizes)

    def side_tp(self) -> dict[str, list[int]]:
        """``{"encoder": [tp, ...], "decoder": [...]}`` for logs and costs."""
        e = len(self.encoder)
        return {"encoder": list(self.tp_sizes[:e]), "decoder": list(self.tp_sizes[e:])}

    @property
    def num_stages(self) -> int:
        return len(self.encoder) + len(self.decoder)

    def side(self, stage: int) -> tuple[str, int]:
        """Global stage -> ("encoder" | "decoder", index within its pipeline)."""
        e = len(self.encoder)
        return ("encoder", stage) if stage < e else ("decoder", stage - e)

    def routes(self, enc: int) -> list[tuple[int, Range]]:
        """The decoder stages encoder stage ``enc`` sends KV to, with the layers each gets."""
        if self.cross:  # T5: the last encoder stage sends every decoder stage its layers
            return list(enumerate(self.decoder)) if enc == len(self.encoder) - 1 else []
        lo, hi = self.encoder[enc]
        return [(k, (max(lo, c), min(hi, d))) for k, (c, d) in enumerate(self.decoder)
                if max(lo, c) < min(hi, d)]


def waa_layout(cfg: CoordinatorConfig, model: ModelConfig) -> WaaLayout:
    enc = parse_ranges(cfg.waa_encoder_layers, "waa_encoder_layers")
    dec = parse_ranges(cfg.waa_decoder_layers, "waa_decoder_layers")
    if not enc or not dec:
        raise ValueError("a staged WAA mesh needs --waa-encoder-layers and --waa-decoder-layers")
    t5 = model.is_encoder_decoder
    # T5's encoder stages split the encoder stack; decoder-only models split one stack twice
    _check_cover(enc, model.num_encoder_layers if t5 else model.num_layers,
                 "waa_encoder_layers")
    _check_cover(dec, model.num_layers, "waa_decoder_layers")
    start = model.pad_token_id if model.pad_token_id is not None else 0  # T5 starts with pad
    return WaaLayout(enc, dec, cross=t5, start_token=start if t5 else 0)


def staged(cfg: CoordinatorConfig) -> bool:
    return cfg.policy == "waa" and cfg.waa_decoder_layers is not None
