"""A staged WAA plan's layout: each encoder and decoder pipeline stage's layers, and which
decoder stages each encoder stage hands KV to (torch-free; coordinator/waa_pipeline.py)."""

from __future__ import annotations

from dataclasses import dataclass

from common.models.config import ModelConfig
from coordinator.config import CoordinatorConfig, parse_ranges
from coordinator.pipeline_driver import _check_cover

Range = tuple[int, int]


@dataclass(frozen=True)
class WaaLayout:
    """Each encoder stage's and each decoder stage's layers, [lo, hi), in pipeline order."""

    encoder: tuple[Range, ...]
    decoder: tuple[Range, ...]

    @property
    def num_stages(self) -> int:
        return len(self.encoder) + len(self.decoder)

    def side(self, stage: int) -> tuple[str, int]:
        """Global stage -> ("encoder" | "decoder", index within its pipeline)."""
        e = len(self.encoder)
        return ("encoder", stage) if stage < e else ("decoder", stage - e)

    def routes(self, enc: int) -> list[tuple[int, Range]]:
        """The decoder stages encoder stage ``enc`` sends KV to, with the layers each gets."""
        lo, hi = self.encoder[enc]
        return [(k, (max(lo, c), min(hi, d))) for k, (c, d) in enumerate(self.decoder)
                if max(lo, c) < min(hi, d)]


def waa_layout(cfg: CoordinatorConfig, model: ModelConfig) -> WaaLayout:
    enc = parse_ranges(cfg.waa_encoder_layers, "waa_encoder_layers")
    dec = parse_ranges(cfg.waa_decoder_layers, "waa_decoder_layers")
    if not enc or not dec:
        raise ValueError("a staged WAA mesh needs --waa-encoder-layers and --waa-decoder-layers")
    if model.is_encoder_decoder:
        raise ValueError(f"{model.name} is an encoder-decoder model: staged WAA runs decoder-only "
                         "models (run T5 with whole-model encoder and decoder workers)")
    _check_cover(enc, model.num_layers, "waa_encoder_layers")
    _check_cover(dec, model.num_layers, "waa_decoder_layers")
    return WaaLayout(enc, dec)


def staged(cfg: CoordinatorConfig) -> bool:
    return cfg.policy == "waa" and cfg.waa_decoder_layers is not None
