"""A per-process host-memory copy of a model's weights, so a stage can be rebuilt without disk.

A re-layout (docs/adaptation.md) gives a pipeline stage worker another layer range. Loading it
from the model file again means reading (and, for GGUF, dequantising) the tensors once more;
instead every tensor of the model is read ONCE per process into host memory (``HostWeights``)
and any layer range is built from that copy. ``build_stage`` copies (and casts) what it takes,
so the stage never aliases the store and one store serves every rebuild. Every tensor is kept,
so a T5 stage's new ranges of both stacks (encoder and decoder layers, the shared embedding,
relative-position biases, the final norms) come from the same copy.

    spec_from_host(model)   the model's ModelSpec with its weights in host memory
                            (loaded on the first call: the "disk" load; later calls: cached)
    python -m common.weightstore [MODEL] [LO:HI ...|roles]   the rebuild times (docs)

The cost is host memory: one full copy of the model in its source dtype beside the stage's own
layers (SmolLM2-135M: ~0.5 GB as float32 after GGUF dequantisation), in every process that
keeps it. Used only when the coordinator adapts (``Assign.config["host_weights"]``, set by
``--adapt``), by:

    pipeline stage workers at tp 1 (launch and re-layout) and every rank re-grouped live into
        another tp_size (decoder_worker.regroup: a TP rank's shard is sliced from the copy by
        ``HostWeights.get``); a pipeline TP rank of the launch's group reads its shard from
        disk and makes the copy at its first re-group
    staged WAA stage workers at any tp_size (``host_weights(..., regroupable=True)``): a
        re-layout or a TP re-group rebuilds the stage or its shard from the copy
    whole-model WAA workers at tp 1 (a role switch); whole-model TP workers do not switch
        live and read only their shard
"""

from __future__ import annotations

import time
from typing import Any

import torch

from common.models.registry import ModelSpec

_STORES: dict[str, tuple[ModelSpec, float]] = {}


class HostWeights:
    """Every tensor of ``source`` read once and kept; ``get`` slices the kept copy (a view,
    which ``build_stage`` copies when it casts / places it)."""

    def __init__(self, source: Any) -> None:
        self._tensors: dict[str, torch.Tensor] = {name: source.get(name)
                                                  for name in source.names()}

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._get(name).shape)

    def get(self, name: str, dim: int | None = None, start: int = 0,
            end: int | None = None) -> torch.Tensor:
        tensor = self._get(name)
        if dim is None:
            return tensor
        stop = tensor.shape[dim] if end is None else end
        if not 0 <= start <= stop <= tensor.shape[dim]:
            raise ValueError(f"slice [{start}:{stop}] out of range for {name!r} dim {dim} "
                             f"({tuple(tensor.shape)})")
        return tensor.narrow(dim, start, stop - start)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def _get(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            from common.models.weights import WeightError

            raise WeightError(f"tensor {name!r} is not in the model")
        return self._tensors[name]


def host_weights(cfg: Any, assign: Any, regroupable: bool = False) -> bool:
    """Keep the model in host memory? When the coordinator adapts (it may re-lay out or
    switch this worker's role live) and the worker is a single rank, or a TP rank that may be
    re-grouped live into another tp_size (``regroupable``: a staged WAA stage; a whole-model
    TP worker never switches, so it keeps only its shard)."""
    return (cfg.tp_size == 1 or regroupable) and bool(assign.config.get("host_weights"))


def spec_from_host(model: str) -> tuple[ModelSpec, float, bool]:
    """(spec with host-memory weights, seconds this call spent loading, True if cached)."""
    if model in _STORES:
        return _STORES[model][0], 0.0, True
    from common.backend_engine import load_spec

    start = time.perf_counter()
    spec = load_spec(model)
    host = spec._replace(weights=HostWeights(spec.weights))
    seconds = time.perf_counter() - start
    _STORES[model] = (host, seconds)
    return host, seconds, False


def measure(model: str, ranges: list[tuple[int, int]], dtype: str = "bfloat16") -> None:
    """Print the rebuild time of stage ranges from disk vs from the host copy (the numbers in
    docs/adaptation.md): ``python -m common.weightstore [MODEL] [LO:HI ...]``."""
    from common.backend_engine import load_spec
    from common.backend_stage_engine import EngineStageBackend

    def build(spec: ModelSpec, layers: tuple[int, int]) -> float:
        start = time.perf_counter()
        EngineStageBackend(spec, layers, None, dtype, "cpu").close()
        return time.perf_counter() - start

    start = time.perf_counter()
    disk = load_spec(model)
    read = time.perf_counter() - start
    print(f"disk: read {read:.2f} s + build {ranges[0]} {build(disk, ranges[0]):.2f} s")
    host, first, _ = spec_from_host(model)
    print(f"host copy (once per process): {first:.2f} s, {host.weights.nbytes / 1e6:.0f} MB")
    for layers in ranges:
        print(f"host: build {layers} {build(host, layers):.2f} s")


def measure_roles(model: str, dtype: str = "bfloat16") -> None:
    """Print a whole-model role switch's rebuild (a WAA worker: encoder <-> decoder) from
    disk vs from the host copy: ``python -m common.weightstore [MODEL] roles``."""
    from common.backend_engine import EngineDecodeBackend, EngineEncodeBackend, load_spec

    def build(spec: ModelSpec, cls: Any) -> float:
        start = time.perf_counter()
        cls(spec, dtype, "cpu").close()
        return time.perf_counter() - start

    start = time.perf_counter()
    disk = load_spec(model)
    read = time.perf_counter() - start
    print(f"disk: read {read:.2f} s + build decoder {build(disk, EngineDecodeBackend):.2f} s")
    host, first, _ = spec_from_host(model)
    print(f"host copy (once per process): {first:.2f} s, {host.weights.nbytes / 1e6:.0f} MB")
    for cls in (EngineEncodeBackend, EngineDecodeBackend):
        print(f"host: build {cls.__name__} {build(host, cls):.2f} s")


if __name__ == "__main__":
    import sys

    torch.set_num_threads(1)
    if len(sys.argv) > 1:
        name = sys.argv[1]
    else:
        from common.models.gguf_loader import default_gguf_path

        name = str(default_gguf_path())
    if sys.argv[2:] == ["roles"]:
        measure_roles(name)
        sys.exit(0)
    spans = [tuple(int(x) for x in a.split(":")) for a in sys.argv[2:]] or [(0, 15), (15, 30)]
    measure(name, [(a, b) for a, b in spans])
