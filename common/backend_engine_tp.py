"""Tensor-parallel encoder workers: the ranks of one TP group run every encode together.

    rank 0 (talks to the mesh)             ranks 1..t-1 (register + heartbeat only)
    encode(items):                         follow():
      broadcast [ENCODE, seqs, tokens] --->   wait for the header
      broadcast seq_lens, token ids    --->   same ragged batch
      stage.encode (TP all-reduces inside) <-> stage.encode
      gather each rank's KV-head slice <---   send its KV-head slice
      sample the first tokens, hand off the whole-head KV (any decoder tp_size imports it:
      the receiver keeps the heads it owns, which is the re-sharding)
    idle(): broadcast [NOOP] every idle second, so a follower whose rank 0 died stops after
    its gloo timeout instead of hanging; close(): broadcast [EXIT].

The group is a real ``torch.distributed`` gloo group of its own (``--tp-init``, one rendezvous
address per worker group), separate from the mesh's sockets. Only integer tensors and float32
KV travel here (no pickle).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from common.backend import Encoded, EncodeItem
from common.backend_engine import EngineEncodeBackend, check_prompt, sampling_params
from common.engine.batch import StageBatch
from common.engine.sampling import Sampler
from common.engine.tp import TPGroup
from common.models.registry import ModelSpec
from common.tensorframe import to_wire

OP_EXIT, OP_NOOP, OP_ENCODE = 0, 1, 2


def init_tp_group(init_method: str, tp_rank: int, tp_size: int, timeout_s: float) -> TPGroup:
    """Join this worker group's gloo group (``tcp://host:port`` shared by its ranks)."""
    dist.init_process_group("gloo", init_method=init_method, rank=tp_rank, world_size=tp_size,
                            timeout=timedelta(seconds=timeout_s))
    return TPGroup(tp_size=tp_size, tp_rank=tp_rank, group=dist.group.WORLD)


class TPEncodeBackend(EngineEncodeBackend):
    """One rank of a TP encoder group; see the module docstring for who does what."""

    def __init__(self, spec: ModelSpec, tp: TPGroup, dtype: str = "bfloat16",
                 device: str = "cpu") -> None:
        super().__init__(spec, dtype, device, tp=tp)
        self.tp = tp

    # ---- rank 0 -------------------------------------------------------------------------
    def encode(self, items: Sequence[EncodeItem]) -> list[Encoded]:
        if not items:
            return []
        for item in items:
            check_prompt(item, self.cfg)  # before broadcasting: every rank must run the batch
        lens = torch.tensor([len(item.prompt) for item in items], dtype=torch.long)
        ids = torch.tensor([t for item in items for t in item.prompt], dtype=torch.long)
        self._header(OP_ENCODE, len(items), int(ids.numel()))
        dist.broadcast(lens, src=0)
        dist.broadcast(ids, src=0)
        return self._run(lens.tolist(), ids, items)

    def idle(self) -> None:
        self._header(OP_NOOP, 0, 0)

    def close(self) -> None:
        self._header(OP_EXIT, 0, 0)
        dist.destroy_process_group()

    def _header(self, op: int, seqs: int, tokens: int) -> None:
        dist.broadcast(torch.tensor([op, seqs, tokens], dtype=torch.long), src=0)

    # ---- ranks > 0 ----------------------------------------------------------------------
    def follow(self) -> int:
        """Run rank 0's batches until it says EXIT; returns the exit code."""
        while True:
            header = torch.zeros(3, dtype=torch.long)
            dist.broadcast(header, src=0)
            op, seqs, tokens = header.tolist()
            if op == OP_EXIT:
                dist.destroy_process_group()
                return 0
            if op == OP_NOOP:
                continue
            lens = torch.zeros(seqs, dtype=torch.long)
            ids = torch.zeros(tokens, dtype=torch.long)
            dist.broadcast(lens, src=0)
            dist.broadcast(ids, src=0)
            self._run(lens.tolist(), ids, None)

    # ---- every rank ---------------------------------------------------------------------
    def _run(self, lens: list[int], ids: torch.Tensor,
             items: Sequence[EncodeItem] | None) -> list[Encoded]:
        names = [f"s{i}" for i in range(len(lens))]
        cache = self.stage.cache
        try:
            logits = self.stage.encode(StageBatch(names, lens, input_ids=ids.to(self.device)))
            exports = [cache.export(r) for r in names]
            gathered = {name: self._gather(torch.cat([e.tensors[name] for e in exports], 2))
                        for name in exports[0].tensors}
        finally:
            for r in names:
                if r in cache:
                    self.stage.free(r)
            self.stage.compact()
        if items is None:
            return []
        sampler = Sampler()
        for name, item in zip(names, items, strict=True):
            sampler.add(name, sampling_params(item.sampling, item.max_new_tokens),
                        position=item.output_offset)  # a re-run continues the seeded draws
        first = sampler.sample(names, logits)
        lengths = {name: [e.tensors[name].shape[2] for e in exports] for name in gathered}
        split = {name: torch.split(t, lengths[name], dim=2) for name, t in gathered.items()}
        return [Encoded(req_id=item.req_id, first_token=int(first[i]), seq_len=exports[i].seq_len,
                        kv={name: to_wire(parts[i].contiguous()) for name, parts in split.items()},
                        head_range=(0, cache.num_kv_heads),
                        layer_range=(cache.layer_start, cache.layer_end))
                for i, item in enumerate(items)]

    def _gather(self, part: torch.Tensor) -> torch.Tensor | None:
        """Rank 0 gets the whole-head tensor [layers, kv_heads, len, D] (replicated heads of a
        tp_size above the KV-head count land on the same place); others get None."""
        cache, tp = self.stage.cache, self.tp
        wide = part.float().contiguous()
        parts = [torch.empty_like(wide) for _ in range(tp.tp_size)] if tp.tp_rank == 0 else None
        dist.gather(wide, parts, dst=0)
        if parts is None:
            return None
        shape = (wide.shape[0], cache.num_kv_heads, *wide.shape[2:])
        full = torch.empty(shape, dtype=torch.float32)
        span = cache.head_end - cache.head_start
        for rank, t in enumerate(parts):
            start = _head_start(cache.num_kv_heads, tp.tp_size, rank, span)
            full[:, start:start + span] = t
        return full.to(cache.dtype)


def _head_start(kv_heads: int, tp_size: int, rank: int, span: int) -> int:
    """First KV head of ``rank`` (the engine's split: even ranges, or replication when
    tp_size exceeds the KV heads)."""
    if tp_size >= kv_heads:
        return rank * kv_heads // tp_size
    return rank * span
