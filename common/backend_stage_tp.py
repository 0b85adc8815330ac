"""Tensor parallelism inside one pipeline stage: the ranks of its TP group run every pass
together; rank 0 alone talks to the mesh (passes in, hidden rows or PassDone out).

Rank 0 checks a pass, then broadcasts what the other ranks need over the group's own gloo
group (``--tp-init``), so every rank holds the same requests in the same cache slots:

    FREE     [op, n]                then the n request handles (freed, then compact)
    PASS     [op, 0]                then [kind, stream, n, rows, h], the n handles, their
             seq_lens, and either the input ids (h == 0, first stage) or the hidden rows as
             float32 [rows, hidden] (h == 1); every rank runs the stage (TP all-reduces inside),
             then rank 0 samples (last stage) or forwards the rows (others)
    NOOP / EXIT                    keep-alive while idle / the worker stops

Requests travel as integer handles (no strings, no pickle). A pass that fails inside the math
fails the same way on every rank; rank 0 then broadcasts FREE of its requests.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.distributed as dist

from common.backend_stage_engine import EngineStageBackend, Range
from common.engine.tp import TPGroup
from common.models.registry import ModelSpec

OP_EXIT, OP_NOOP, OP_FREE, OP_PASS = range(4)
KINDS = ("encode", "decode")


def _bcast(values: list[int]) -> list[int]:
    t = torch.tensor(values, dtype=torch.long)
    dist.broadcast(t, src=0)
    return t.tolist()


def _recv(n: int) -> list[int]:
    t = torch.zeros(n, dtype=torch.long)
    dist.broadcast(t, src=0)
    return t.tolist()


class TPStageBackend(EngineStageBackend):
    """One rank of a stage's TP group; rank 0 is what the StageLoop drives, the others
    ``follow()`` it."""

    def __init__(self, spec: ModelSpec, tp: TPGroup, layer_range: Range | None = None,
                 encoder_layer_range: Range | None = None, dtype: str = "bfloat16",
                 device: str = "cpu") -> None:
        super().__init__(spec, layer_range, encoder_layer_range, dtype, device, tp=tp)
        self.tp = tp
        self._handles = itertools.count()
        self._handle_of: dict[str, int] = {}

    # ---- rank 0 ---------------------------------------------------------------------------
    def _admit(self, requests: Any, stream: int) -> None:
        for req in requests:
            self._handle_of[req.req_id] = next(self._handles)
        super()._admit(requests, stream)

    def _release(self, req_ids: list[str]) -> None:
        super()._release(req_ids)
        for r in req_ids:
            self._handle_of.pop(r, None)

    def _name(self, req_id: str) -> str:
        return str(self._handle_of[req_id])

    def _free_names(self, names: list[str]) -> None:
        _bcast([OP_FREE, len(names)])
        _bcast([int(n) for n in names])
        super()._free_names(names)

    def _forward(self, kind: str, stream: int, names: list[str], seq_lens: list[int],
                 ids: list[int] | None, hidden: torch.Tensor | None) -> torch.Tensor:
        rows = sum(seq_lens)
        _bcast([OP_PASS, 0])
        _bcast([KINDS.index(kind), stream, len(names), rows, int(ids is None)])
        _bcast([int(n) for n in names])
        _bcast(seq_lens)
        if ids is not None:
            _bcast(ids)
        else:
            assert hidden is not None
            hidden = hidden.float().contiguous()  # gloo broadcasts float32, not bf16
            dist.broadcast(hidden, src=0)
        return super()._forward(kind, stream, names, seq_lens, ids, hidden)

    def idle(self) -> None:
        _bcast([OP_NOOP, 0])

    def close(self) -> None:
        _bcast([OP_EXIT, 0])
        dist.destroy_process_group()

    # ---- ranks > 0 ------------------------------------------------------------------------
    def follow(self) -> int:
        """Mirror rank 0's passes until it says EXIT; returns the exit code."""
        while True:
            op, arg = _recv(2)
            if op == OP_EXIT:
                dist.destroy_process_group()
                return 0
            if op == OP_FREE:
                EngineStageBackend._free_names(self, [str(h) for h in _recv(arg)])
            elif op == OP_PASS:
                self._follow_pass()

    def _follow_pass(self) -> None:
        kind, stream, n, rows, has_hidden = _recv(5)
        names = [str(h) for h in _recv(n)]
        seq_lens = _recv(n)
        ids = hidden = None
        if has_hidden:
            hidden = torch.empty((rows, self.model.hidden_size), dtype=torch.float32)
            dist.broadcast(hidden, src=0)
        else:
            ids = _recv(rows)
        try:
            EngineStageBackend._forward(self, KINDS[kind], stream, names, seq_lens, ids,
                                        hidden)
        except ValueError:
            pass  # rank 0 failed the same way and broadcasts FREE of these requests next
