"""Where weights come from: one Protocol, read lazily and by slice, so each rank loads its shard.

Names are the Hugging Face transformers names of the family (``model.layers.0.self_attn.q_proj
.weight``...). A stage asks only for the tensors of its layer range and only for its TP slice
(``get(name, dim, start, end)``); safetensors' ``get_slice`` makes that a partial file read.
``RandomWeights`` produces the same names and shapes from a preset, deterministically from
(seed, name), so every rank and every tp_size sees the same model.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from common.models.config import ModelConfig


class WeightError(ValueError):
    """Missing, corrupt or mismatching weights; the message names the file or tensor."""


@runtime_checkable
class WeightSource(Protocol):
    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str, dim: int | None = None, start: int = 0,
            end: int | None = None) -> torch.Tensor: ...


def _check_slice(name: str, shape: tuple[int, ...], dim: int | None, start: int,
                 end: int | None) -> int | None:
    if dim is None:
        return None
    if not 0 <= dim < len(shape):
        raise WeightError(f"tensor {name!r} of shape {shape} has no dimension {dim}")
    stop = shape[dim] if end is None else end
    if not 0 <= start <= stop <= shape[dim]:
        raise WeightError(f"slice [{start}:{stop}] out of range for {name!r} dim {dim} ({shape})")
    return stop


class SafetensorsWeights:
    """A Hugging Face directory with ``model.safetensors`` or a sharded index."""

    def __init__(self, directory: str | Path) -> None:
        from safetensors import safe_open

        self.directory = Path(directory)
        self._files = self._tensor_files()
        self._handles = {}
        for file in sorted(set(self._files.values())):
            try:
                self._handles[file] = safe_open(str(self.directory / file), framework="pt")
            except Exception as exc:  # safetensors raises several private error types
                raise WeightError(f"cannot read {self.directory / file}: {exc}") from exc
        self._shapes: dict[str, tuple[int, ...]] = {}

    def _tensor_files(self) -> dict[str, str]:
        index = self.directory / "model.safetensors.index.json"
        single = self.directory / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise WeightError(f"corrupt safetensors index {index}: {exc}") from exc
            missing = sorted({f for f in weight_map.values() if not (self.directory / f).exists()})
            if missing:
                raise WeightError(f"{index} lists missing shard files: {missing}")
            return dict(weight_map)
        if single.exists():
            from safetensors import safe_open

            try:
                with safe_open(str(single), framework="pt") as handle:
                    return {name: single.name for name in handle.keys()}  # noqa: SIM118
            except Exception as exc:
                raise WeightError(f"cannot read {single}: {exc}") from exc
        raise WeightError(
            f"no model.safetensors or model.safetensors.index.json in {self.directory}"
        )

    def names(self) -> list[str]:
        return sorted(self._files)

    def _handle(self, name: str):  # noqa: ANN202 - safetensors handle type is private
        if name not in self._files:
            raise WeightError(f"tensor {name!r} not found in {self.directory}")
        return self._handles[self._files[name]]

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._shapes:
            self._shapes[name] = tuple(self._handle(name).get_slice(name).get_shape())
        return self._shapes[name]

    def get(self, name: str, dim: int | None = None, start: int = 0,
            end: int | None = None) -> torch.Tensor:
        shape = self.shape(name)
        stop = _check_slice(name, shape, dim, start, end)
        piece = self._handle(name).get_slice(name)
        try:
            if dim is None:
                return piece[:]
            index = tuple([slice(None)] * dim + [slice(start, stop)])
            return piece[index]
        except Exception as exc:
            raise WeightError(f"cannot read tensor {name!r} from {self.directory}: {exc}") from exc


class RandomWeights:
    """Deterministic random weights for a preset: N(0, std) matrices, unit norms, zero biases.

    Rows are generated in fixed blocks seeded by (seed, name, block), so a slice reads only the
    blocks it touches and every slicing of a tensor agrees with the whole."""

    BLOCK_ROWS = 256

    def __init__(self, cfg: ModelConfig, seed: int = 0, std: float = 0.02) -> None:
        from common.models.registry import family_module

        self.cfg = cfg
        self.seed = seed
        self.std = std
        self._shapes = family_module(cfg.family).weight_shapes(cfg)

    def names(self) -> list[str]:
        return sorted(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._shapes:
            raise WeightError(f"tensor {name!r} is not part of a {self.cfg.family} model")
        return self._shapes[name]

    def get(self, name: str, dim: int | None = None, start: int = 0,
            end: int | None = None) -> torch.Tensor:
        shape = self.shape(name)
        stop = _check_slice(name, shape, dim, start, end)
        if _is_norm(name) or len(shape) == 1:
            fill = 1.0 if _is_norm(name) and name.endswith("weight") else 0.0
            full = torch.full(shape, fill)
            return full if dim is None else full.narrow(dim, start, stop - start)
        row_lo, row_hi = (start, stop) if dim == 0 else (0, shape[0])
        blocks = []
        first = row_lo // self.BLOCK_ROWS
        for block in range(first, -(-row_hi // self.BLOCK_ROWS)):
            rows = self._block(name, shape, block)
            if dim is not None and dim != 0:
                rows = rows.narrow(dim, start, stop - start)
            blocks.append(rows)
        out = torch.cat(blocks, dim=0)
        offset = row_lo - first * self.BLOCK_ROWS
        return out[offset:offset + row_hi - row_lo].contiguous()

    def _block(self, name: str, shape: tuple[int, ...], block: int) -> torch.Tensor:
        lo = block * self.BLOCK_ROWS
        hi = min(lo + self.BLOCK_ROWS, shape[0])
        gen = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{name}:{block}".encode()))
        return torch.randn((hi - lo, *shape[1:]), generator=gen).mul_(self.std)


def _is_norm(name: str) -> bool:
    lowered = name.lower()
    return any(key in lowered for key in ("norm", "ln_", "layernorm", "layer_norm"))
