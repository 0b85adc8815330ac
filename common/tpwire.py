"""The wire of a TP group's own gloo process group: rank 0 broadcasts, the other ranks mirror.

The TP decoder workers (backend_engine_tpdec.py) and the TP pipeline stages
(backend_stage_tp.py) speak the same framing: an ``[op, arg]`` header of int64, then the op's
integers and float32 tensors. The two ops every wire has, EXIT and NOOP, are 0 and 1 here so
the header helpers can serve both; each backend numbers its own ops from 2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

OP_EXIT, OP_NOOP = 0, 1


def send_ints(values: Sequence[int]) -> None:
    """Rank 0: broadcast ``values`` (the receivers know how many from an earlier header)."""
    dist.broadcast(torch.tensor(list(values), dtype=torch.long), src=0)


def recv_ints(n: int) -> list[int]:
    """Ranks > 0: the ``n`` integers rank 0 broadcast with ``send_ints``."""
    t = torch.zeros(n, dtype=torch.long)
    dist.broadcast(t, src=0)
    return t.tolist()


def send_floats(t: torch.Tensor) -> None:
    """Rank 0: broadcast ``t`` as float32 (gloo broadcasts float32, not bfloat16)."""
    dist.broadcast(t.float().contiguous(), src=0)


def recv_floats(shape: Sequence[int]) -> torch.Tensor:
    """Ranks > 0: the float32 tensor of ``shape`` rank 0 broadcast with ``send_floats``."""
    buf = torch.empty(tuple(shape), dtype=torch.float32)
    dist.broadcast(buf, src=0)
    return buf


def send_noop() -> None:
    """Rank 0 while idle: keeps the followers' blocking broadcast from timing out."""
    send_ints([OP_NOOP, 0])


def send_exit() -> None:
    """Rank 0 stopping: tell the followers, then leave the group."""
    send_ints([OP_EXIT, 0])
    dist.destroy_process_group()


def recv_header() -> tuple[int, int] | None:
    """Ranks > 0: the next ``(op, arg)``; None (after leaving the group) when rank 0 exits."""
    op, arg = recv_ints(2)
    if op == OP_EXIT:
        dist.destroy_process_group()
        return None
    return op, arg
