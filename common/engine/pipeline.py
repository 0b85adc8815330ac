"""The passes the generation loop drives: one local stage, or this rank's stage of a group.

A ``Pipeline`` turns a ``StageBatch`` into the next token of each sequence: it runs the stage,
passes activations between stages (rank t of stage s -> rank t of stage s+1), samples on the
last stage and broadcasts the tokens so that every rank keeps the same requests and slots.
``save_kv``/``load_kv`` move a batch's KV through files (safetensors: tensors + string
metadata, no pickle) between runs with different tp layouts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from common.engine.batch import StageBatch
from common.engine.kv_cache import KVCache, KVExport
from common.engine.sampling import Sampler


class Pipeline(Protocol):
    sampler: Sampler
    cache: KVCache
    device: torch.device

    def encode(self, batch: StageBatch) -> list[int]: ...

    def decode(self, batch: StageBatch) -> list[int]: ...

    def free(self, req_id: str) -> None: ...

    def order(self) -> list[str]: ...


class LocalPipeline:
    """All layers in this process (tp_size 1, one stage)."""

    def __init__(self, stage: Any) -> None:
        self.stage = stage
        self.cache: KVCache = stage.cache
        self.device = torch.device(stage.device)
        self.sampler = Sampler()

    def encode(self, batch: StageBatch) -> list[int]:
        return self.sampler.sample(batch.req_ids, self.stage.encode(batch))

    def decode(self, batch: StageBatch) -> list[int]:
        return self.sampler.sample(batch.req_ids, self.stage.decode(batch))

    def free(self, req_id: str) -> None:
        self.stage.free(req_id)
        self.sampler.remove(req_id)

    def order(self) -> list[str]:
        self.stage.compact()
        return self.cache.order()


class StagePipeline(LocalPipeline):
    """This rank's stage inside a spawned group (see common.engine.dist for the layout)."""

    def __init__(self, stage: Any, topo: Any, hidden_size: int) -> None:
        super().__init__(stage)
        self.topo, self.hidden_size = topo, hidden_size

    def encode(self, batch: StageBatch) -> list[int]:
        return self._pass("encode", batch)

    def decode(self, batch: StageBatch) -> list[int]:
        return self._pass("decode", batch)

    def _pass(self, kind: str, batch: StageBatch) -> list[int]:
        from common.engine.dist import recv_activation, send_activation

        topo = self.topo
        if not topo.is_first:
            src = topo.rank_of(topo.stage - 1, topo.tp_rank)
            hidden = recv_activation((batch.num_tokens, self.hidden_size), src,
                                     self.stage.dtype, self.device)
            batch = batch.with_hidden(hidden)
        out = getattr(self.stage, kind)(batch)
        tokens = torch.zeros(batch.num_seqs, dtype=torch.long, device=self._comm_device)
        if not topo.is_last:
            send_activation(out, topo.rank_of(topo.stage + 1, topo.tp_rank))
        elif topo.rank == topo.sampler_rank:
            tokens = torch.tensor(self.sampler.sample(batch.req_ids, out), dtype=torch.long,
                                  device=self._comm_device)
        if topo.world_size > 1:
            dist.broadcast(tokens, src=topo.sampler_rank)
        return tokens.tolist()

    @property
    def _comm_device(self) -> torch.device:
        """NCCL moves CUDA tensors only; gloo CPU ones."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def save_kv(cache: KVCache, directory: Path, req_ids: list[str], first_tokens: list[int],
            rank: int) -> None:
    """Write this rank's KV of each request and (rank 0) the first sampled tokens."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    for req_id in req_ids:
        exp = cache.export(req_id)
        meta = {k: str(getattr(exp, k)) for k in ("req_id", "seq_len", "layer_start",
                                                  "layer_end", "head_start", "head_end",
                                                  "num_kv_heads")}
        save_file(exp.tensors, str(directory / f"{req_id}.rank{rank}.safetensors"), meta)
    if rank == 0:
        (directory / "first_tokens.json").write_text(
            json.dumps(dict(zip(req_ids, first_tokens, strict=True))))


def read_kv_file(path: Path) -> KVExport:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    ints = {k: int(meta[k]) for k in ("seq_len", "layer_start", "layer_end", "head_start",
                                      "head_end", "num_kv_heads")}
    return KVExport(req_id=meta["req_id"], tensors=tensors, **ints)


def load_kv(cache: KVCache, directory: Path, req_ids: list[str]) -> list[int]:
    """Import every saved export overlapping this cache; returns the saved first tokens."""
    first = json.loads((directory / "first_tokens.json").read_text())
    for req_id in req_ids:
        files = sorted(directory.glob(f"{req_id}.rank*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no saved KV for {req_id!r} in {directory}")
        for path in files:
            cache.import_(read_kv_file(path))
        if req_id not in cache:
            raise ValueError(f"saved KV for {req_id!r} does not cover this stage's layers/heads")
    return [int(first[r]) for r in req_ids]
