"""Tensor parallelism inside one pipeline stage: the ranks of its TP group run every pass
together; rank 0 alone talks to the mesh (passes in, hidden rows or PassDone out).

Rank 0 checks a pass, then broadcasts what the other ranks need over the group's own gloo
group (``--tp-init``), so every rank holds the same requests in the same cache slots:

    FREE     [op, n]                then the n request handles (freed, then compact)
    PASS     [op, 0]                then [kind, stream, n, rows, h], the n handles, their
             seq_lens, and either the input ids (h == 0, first stage) or the hidden rows as
             float32 [rows, hidden] (h == 1); every rank runs the stage (TP all-reduces inside),
             then rank 0 samples (last stage) or forwards the rows (others)
    START    [op, 0]                then [stream, n, tokens, e, h], the n handles, their encoder
             lengths, the encoder output float32 [tokens, hidden] (e == 1) and the decoder
             rows float32 [n, hidden] (h == 1): lap 1 of a T5 encode over several stages
    NOOP / EXIT                    keep-alive while idle / the worker stops
    REGROUP  [op, 0]                a live re-group (decoder_worker.regroup): every rank
                                   leaves this gloo group here, at a collective boundary,
                                   and waits for its next Assign instead of exiting

Requests travel as integer handles (no strings, no pickle). A pass that fails inside the math
fails the same way on every rank; rank 0 then broadcasts FREE of its requests.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from common import tpwire
from common.backend_stage_engine import EngineStageBackend, Range
from common.engine.tp import TPGroup
from common.models.registry import ModelSpec

OP_FREE, OP_PASS, OP_START, OP_REGROUP = 2, 3, 4, 5  # after tpwire's OP_EXIT, OP_NOOP
KINDS = ("encode", "decode")
REGROUP = -1  # follow()'s result when rank 0 left the group for a re-group (not an exit code)


class TPStageBackend(EngineStageBackend):
    """One rank of a stage's TP group; rank 0 is what the StageLoop drives, the others
    ``follow()`` it."""

    def __init__(self, spec: ModelSpec, tp: TPGroup, layer_range: Range | None = None,
                 encoder_layer_range: Range | None = None, dtype: str = "bfloat16",
                 device: str = "cpu", encoder_out_onward: bool = True) -> None:
        super().__init__(spec, layer_range, encoder_layer_range, dtype, device, tp=tp,
                         encoder_out_onward=encoder_out_onward)
        self.tp = tp
        self._handles = itertools.count()
        self._handle_of: dict[str, int] = {}
        self._left = False  # this rank left its gloo group (a re-group): close() sends nothing

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
        tpwire.send_ints([OP_FREE, len(names)])
        tpwire.send_ints([int(n) for n in names])
        super()._free_names(names)

    def _forward(self, kind: str, stream: int, names: list[str], seq_lens: list[int],
                 ids: list[int] | None, hidden: torch.Tensor | None) -> torch.Tensor:
        rows = sum(seq_lens)
        tpwire.send_ints([OP_PASS, 0])
        tpwire.send_ints([KINDS.index(kind), stream, len(names), rows, int(ids is None)])
        tpwire.send_ints([int(n) for n in names])
        tpwire.send_ints(seq_lens)
        if ids is not None:
            tpwire.send_ints(ids)
        else:
            assert hidden is not None
            hidden = hidden.float().contiguous()  # the followers run on float32 rows too
            tpwire.send_floats(hidden)
        return super()._forward(kind, stream, names, seq_lens, ids, hidden)

    def _start(self, stream: int, names: list[str], enc_lens: list[int],
               encoder_out: torch.Tensor | None, hidden: torch.Tensor | None) -> torch.Tensor:
        tpwire.send_ints([OP_START, 0])
        tpwire.send_ints([stream, len(names), sum(enc_lens), int(encoder_out is not None),
                          int(hidden is not None)])
        tpwire.send_ints([int(n) for n in names])
        tpwire.send_ints(enc_lens)
        if encoder_out is not None:  # every rank computes on the same float32 rows
            encoder_out = encoder_out.float().contiguous()
            tpwire.send_floats(encoder_out)
        if hidden is not None:
            hidden = hidden.float().contiguous()
            tpwire.send_floats(hidden)
        return super()._start(stream, names, enc_lens, encoder_out, hidden)

    def idle(self) -> None:
        tpwire.send_noop()

    def close(self) -> None:
        if not self._left:
            tpwire.send_exit()

    def leave_group(self) -> None:
        """Rank 0, re-grouping (decoder_worker.regroup): the followers leave with it, at this
        header, and wait for their own Assign; the process group is destroyed on every rank."""
        import torch.distributed as dist

        tpwire.send_ints([OP_REGROUP, 0])
        dist.destroy_process_group()
        self._left = True

    # ---- ranks > 0 ------------------------------------------------------------------------
    def follow(self) -> int:
        """Mirror rank 0's passes until it says EXIT (returns the exit code, 0) or REGROUP
        (returns ``REGROUP``: this rank left the group and takes its next Assign)."""
        while (header := tpwire.recv_header()) is not None:
            op, arg = header
            if op == OP_REGROUP:
                import torch.distributed as dist

                dist.destroy_process_group()
                self._left = True
                return REGROUP
            if op == OP_FREE:
                EngineStageBackend._free_names(self, [str(h) for h in tpwire.recv_ints(arg)])
            elif op == OP_PASS:
                self._follow_pass()
            elif op == OP_START:
                self._follow_start()
        return 0

    def _follow_start(self) -> None:
        stream, n, tokens, has_enc, has_hidden = tpwire.recv_ints(5)
        names = [str(h) for h in tpwire.recv_ints(n)]
        enc_lens = tpwire.recv_ints(n)
        size = self.model.hidden_size
        encoder_out = tpwire.recv_floats((tokens, size)) if has_enc else None
        hidden = tpwire.recv_floats((n, size)) if has_hidden else None
        try:
            EngineStageBackend._start(self, stream, names, enc_lens, encoder_out, hidden)
        except ValueError:
            pass  # rank 0 failed the same way and broadcasts FREE of these requests next

    def _follow_pass(self) -> None:
        kind, stream, n, rows, has_hidden = tpwire.recv_ints(5)
        names = [str(h) for h in tpwire.recv_ints(n)]
        seq_lens = tpwire.recv_ints(n)
        ids = hidden = None
        if has_hidden:
            hidden = tpwire.recv_floats((rows, self.model.hidden_size))
        else:
            ids = tpwire.recv_ints(rows)
        try:
            EngineStageBackend._forward(self, KINDS[kind], stream, names, seq_lens, ids,
                                        hidden)
        except ValueError:
            pass  # rank 0 failed the same way and broadcasts FREE of these requests next
