"""Tensor parallelism inside a staged WAA stage: the TP stage wire of common.backend_stage_tp
(rank 0 broadcasts every pass and free; all ranks run the math) plus two ops for the handoff:

    EXPORT  [op, n]   then [stream, n handles]: every rank exports its KV heads of those
                      requests over the stage's layers; rank 0 gathers the whole heads (the
                      KVHandoff carries every head, as a TP encoder worker's does)
    JOIN    [op, n]   then per KV part [handle, stream, layer_start, layer_end, head_start,
                      head_end, seq_len, m] and its m tensors, each [name, length] (an index
                      into KV_NAMES, its length along the sequence) and float32 values: every
                      rank imports the heads it owns (the re-sharding), in the same order, so
                      slots agree
    REGROUP [op, 0]   the stage wire's (op 5, so EXPORT and JOIN are 6 and 7): a live re-group
                      (coordinator.relayout_tp.WaaTpRelayout); every rank leaves the gloo group
                      at this header and takes its next Assign (decoder_worker.regroup)

The tensors are the stage's ``kv_names``: decoder-only models hand on self-attention "k" and
"v", T5 the cross-attention "cross_k" and "cross_v" (whose length is the encoder input's, not
``seq_len``). Requests travel as integer handles.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from common import protocol as P
from common import tpwire
from common.backend_engine_tp import _head_start
from common.backend_stage_engine import EngineStageBackend
from common.backend_stage_tp import OP_FREE, OP_PASS, OP_REGROUP, OP_START, REGROUP, TPStageBackend
from common.backend_waa_stage import WaaDecoderStage, WaaEncoderStage
from common.engine.kv_cache import KVCache, KVExport

OP_EXPORT, OP_JOIN = 6, 7  # after the stage wire's ops (OP_REGROUP is 5)
KV_NAMES = ("k", "v", "cross_k", "cross_v")  # JOIN names a tensor by its index here
PART_INTS = 8


class TPFollowMixin:
    """``follow`` for ranks > 0: the stage ops plus EXPORT and JOIN; REGROUP (a live re-group
    of a staged WAA mesh: coordinator.relayout_tp.WaaTpRelayout) leaves the gloo group at this
    header and returns ``REGROUP`` (the FollowerLoop then takes its next Assign)."""

    def follow(self) -> int:
        me: Any = self
        while (header := tpwire.recv_header()) is not None:
            op, arg = header
            if op == OP_REGROUP:
                dist.destroy_process_group()
                me._left = True
                return REGROUP
            if op == OP_EXPORT:
                stream, *handles = tpwire.recv_ints(arg + 1)
                me.gather_exports(stream, [str(h) for h in handles])
            elif op == OP_JOIN:
                for _ in range(arg):
                    me.import_part(*_recv_part(me))
            elif op == OP_FREE:
                EngineStageBackend._free_names(me, [str(h) for h in tpwire.recv_ints(arg)])
            elif op == OP_PASS:
                me._follow_pass()
            elif op == OP_START:
                me._follow_start()
        return 0


class TPWaaEncoderStage(TPFollowMixin, TPStageBackend, WaaEncoderStage):
    """An encoder stage's TP rank; rank 0's exports hold every KV head."""

    def export_batch(self, req_ids: list[str], stream: int) -> dict[str, KVExport]:
        names = [self._name(r) for r in req_ids]
        tpwire.send_ints([OP_EXPORT, len(names)])
        tpwire.send_ints([stream, *(int(n) for n in names)])
        return dict(zip(req_ids, self.gather_exports(stream, names), strict=True))

    def gather_exports(self, stream: int, names: list[str]) -> list[KVExport]:
        """Every rank: export its heads; rank 0 returns the whole-head exports."""
        cache = self._cache(stream)
        local = [cache.export(n) for n in names]
        kv_names = self.kv_names
        full = {t: _gather_heads(torch.cat([e.tensors[t] for e in local], 2), cache, self.tp)
                for t in kv_names}
        if self.tp.tp_rank != 0:
            return []
        split = {t: torch.split(whole, [e.tensors[t].shape[2] for e in local], dim=2)
                 for t, whole in full.items()}  # each tensor's own length (T5's cross K/V)
        return [KVExport(req_id=e.req_id, seq_len=e.seq_len, layer_start=e.layer_start,
                         layer_end=e.layer_end, head_start=0, head_end=cache.num_kv_heads,
                         num_kv_heads=cache.num_kv_heads,
                         tensors={t: split[t][i].contiguous() for t in kv_names})
                for i, e in enumerate(local)]


class TPWaaDecoderStage(TPFollowMixin, TPStageBackend, WaaDecoderStage):
    """A decoder stage's TP rank; rank 0 hands every joining request's KV to the others."""

    def join(self, sp: P.StagePass) -> None:
        new = [r for r in sp.req_ids if r not in self.seqs]
        parts = [(r, p) for r in new for p in self.pending[r].parts]
        for r in new:
            self._handle_of[r] = next(self._handles)
        if parts:
            tpwire.send_ints([OP_JOIN, len(parts)])
            for r, part in parts:  # take() let only KV_NAMES in
                tpwire.send_ints([int(self._name(r)), sp.stream, part.layer_start,
                                  part.layer_end, part.head_start, part.head_end,
                                  part.seq_len, len(part.tensors)])
                for t, values in part.tensors.items():
                    tpwire.send_ints([KV_NAMES.index(t), int(values.shape[2])])
                    tpwire.send_floats(values)
        super().join(sp)  # rank 0 imports its own heads the same way

    def import_part(self, name: str, stream: int, exp: KVExport) -> None:
        """Followers: one KV part into ``stream``'s cache (the heads this rank owns)."""
        self._cache(stream).import_(exp)
        self._stream_of[name] = stream


def _recv_part(stage: Any) -> tuple[str, int, KVExport]:
    handle, stream, l0, l1, h0, h1, seq_len, count = tpwire.recv_ints(PART_INTS)
    cache = stage._cache(stream)
    tensors = {}
    for _ in range(count):
        name, length = tpwire.recv_ints(2)
        shape = (l1 - l0, h1 - h0, length, cache.head_dim)
        tensors[KV_NAMES[name]] = tpwire.recv_floats(shape).to(cache.dtype)
    return str(handle), stream, KVExport(req_id=str(handle), seq_len=seq_len, layer_start=l0,
                                         layer_end=l1, head_start=h0, head_end=h1,
                                         num_kv_heads=cache.num_kv_heads, tensors=tensors)


def _gather_heads(part: torch.Tensor, cache: KVCache, tp: Any) -> torch.Tensor | None:
    """Rank 0 gets [layers, kv_heads, len, D] from every rank's head slice; others None."""
    wide = part.float().contiguous()
    parts = [torch.empty_like(wide) for _ in range(tp.tp_size)] if tp.tp_rank == 0 else None
    dist.gather(wide, parts, dst=0)
    if parts is None:
        return None
    full = torch.empty((wide.shape[0], cache.num_kv_heads, *wide.shape[2:]),
                       dtype=torch.float32)
    span = cache.head_end - cache.head_start
    for rank, t in enumerate(parts):
        start = _head_start(cache.num_kv_heads, tp.tp_size, rank, span)
        full[:, start:start + span] = t
    return full.to(cache.dtype)
