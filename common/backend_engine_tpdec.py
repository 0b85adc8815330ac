"""Tensor-parallel decoder workers: the ranks of one TP group run the running batch together.

Rank 0 owns the mesh side (KV arrivals, cancels, tokens out) and the sampler; every change to
the batch is broadcast first so all ranks hold the same sequences in the same cache slots:

    ADD     [op, handle, names]   then per KV tensor: its shape, then its float32 values
            (the whole-head export the encoder sent; each rank imports the heads it owns)
    STEP    [op, n]               then the n handles in batch order and their last tokens;
            every rank decodes (TP all-reduces inside); rank 0 samples, then
    FREE    [op, n]               then the n handles that finished (or were cancelled)
    NOOP / EXIT                   keep-alive while idle / the worker stops

Requests are named by integer handles on the group's wire (no strings, no pickle).
"""

from __future__ import annotations

import itertools

import torch

from common import tpwire
from common.backend import DecodeSeq, StepToken
from common.backend_engine import EngineDecodeBackend
from common.engine.batch import StageBatch
from common.engine.kv_cache import KVExport
from common.engine.tp import TPGroup
from common.models.registry import ModelSpec

OP_ADD, OP_STEP, OP_FREE = 2, 3, 4  # after tpwire's OP_EXIT, OP_NOOP
KV_NAMES = ("k", "v", "cross_k", "cross_v")


class TPDecodeBackend(EngineDecodeBackend):
    """One rank of a TP decoder group; rank 0 is what the DecoderLoop drives."""

    def __init__(self, spec: ModelSpec, tp: TPGroup, dtype: str = "bfloat16",
                 device: str = "cpu") -> None:
        super().__init__(spec, dtype, device, tp=tp)
        self.tp = tp
        self._handles = itertools.count()
        self._handle_of: dict[str, int] = {}
        self._req_of: dict[int, str] = {}

    # ---- rank 0: the DecodeBackend protocol ---------------------------------------------
    def add(self, seq: DecodeSeq) -> None:
        if seq.req_id in self._seqs:
            raise ValueError(f"request {seq.req_id} is already decoding here")
        handle = next(self._handles)
        tensors = {n: t.as_torch() if hasattr(t, "as_torch") else t for n, t in seq.kv.items()}
        names = [KV_NAMES.index(n) for n in tensors]
        head_range = seq.head_range or (0, self.stage.cache.num_kv_heads)
        layers = seq.layer_range or (0, self.cfg.num_layers)
        tpwire.send_ints([OP_ADD, handle])
        tpwire.send_ints([len(names), *head_range, *layers])
        tpwire.send_ints(names)
        for t in tensors.values():
            tpwire.send_ints(list(t.shape))
            tpwire.send_floats(t)
        self._import(handle, tensors, head_range, layers)
        self._handle_of[seq.req_id], self._req_of[handle] = handle, seq.req_id
        self.register(seq)

    def remove(self, req_id: str) -> None:
        handle = self._handle_of.get(req_id)
        if handle is None:
            return
        tpwire.send_ints([OP_FREE, 1])
        tpwire.send_ints([handle])
        self._drop(req_id)

    def step(self) -> list[StepToken]:
        if not self._seqs:
            return []
        self.stage.compact()
        order = [self._req_of[int(h)] for h in self.stage.cache.order()]
        handles = [self._handle_of[r] for r in order]
        last = [self._last[r] for r in order]
        tpwire.send_ints([OP_STEP, len(order)])
        tpwire.send_ints(handles)
        tpwire.send_ints(last)
        logits = self.stage.decode(StageBatch.from_tokens([str(h) for h in handles], last,
                                                          self.device))
        out = self.finish_step(order, self.sampler.sample(order, logits))
        done = [self._handle_of[t.req_id] for t in out if t.finished]
        if done:
            tpwire.send_ints([OP_FREE, len(done)])
            tpwire.send_ints(done)
            for t in out:
                if t.finished:
                    self._drop(t.req_id)
        return out

    def idle(self) -> None:
        tpwire.send_noop()

    def close(self) -> None:
        tpwire.send_exit()

    def _drop(self, req_id: str) -> None:
        handle = self._handle_of.pop(req_id)
        del self._req_of[handle]
        self._seqs.pop(req_id, None)
        self._last.pop(req_id, None)
        self.sampler.remove(req_id)
        self.stage.free(str(handle))

    # ---- every rank ---------------------------------------------------------------------
    def _import(self, handle: int, tensors: dict[str, torch.Tensor],
                head_range: tuple[int, int] | list[int], layers: tuple[int, int] | list[int],
                ) -> None:
        cache = self.stage.cache
        seq_len = int(tensors["k"].shape[2]) if "k" in tensors else 0
        cache.import_(KVExport(req_id=str(handle), seq_len=seq_len, layer_start=layers[0],
                               layer_end=layers[1], head_start=head_range[0],
                               head_end=head_range[1], num_kv_heads=cache.num_kv_heads,
                               tensors={n: t.to(cache.dtype) for n, t in tensors.items()}))

    # ---- ranks > 0 ----------------------------------------------------------------------
    def follow(self) -> int:
        """Mirror rank 0's batch until it says EXIT; returns the exit code."""
        while (header := tpwire.recv_header()) is not None:
            op, arg = header
            if op == OP_ADD:
                self._follow_add(arg)
            elif op == OP_STEP:
                handles, last = tpwire.recv_ints(arg), tpwire.recv_ints(arg)
                self.stage.compact()
                self.stage.decode(StageBatch.from_tokens([str(h) for h in handles], last,
                                                         self.device))
            elif op == OP_FREE:
                for handle in tpwire.recv_ints(arg):
                    self.stage.free(str(handle))
        return 0

    def _follow_add(self, handle: int) -> None:
        count, h0, h1, l0, l1 = tpwire.recv_ints(5)
        names = [KV_NAMES[i] for i in tpwire.recv_ints(count)]
        tensors = {}
        for name in names:
            tensors[name] = tpwire.recv_floats(tpwire.recv_ints(4))
        self._import(handle, tensors, (h0, h1), (l0, l1))
