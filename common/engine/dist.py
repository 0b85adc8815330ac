"""Local process groups for tensor/pipeline parallelism: spawn, rendezvous, collect, fail fast.

Rank layout: ``rank = stage * tp_size + tp_rank``. Each stage's ranks form one TP group; rank t
of stage s sends its activations to rank t of stage s+1 (after the row-parallel all-reduce every
TP rank holds the full hidden state). Children exchange only JSON with the parent (arguments in,
result file out; no pickle of data), and a child's traceback is re-raised in the parent.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing as mp
import os
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from common.engine.tp import TPGroup


@dataclass(frozen=True)
class Topology:
    tp_size: int
    num_stages: int
    rank: int

    def __post_init__(self) -> None:
        if self.tp_size < 1 or self.num_stages < 1:
            raise ValueError("tp_size and num_stages must be >= 1")

    @property
    def world_size(self) -> int:
        return self.tp_size * self.num_stages

    @property
    def stage(self) -> int:
        return self.rank // self.tp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    def rank_of(self, stage: int, tp_rank: int) -> int:
        return stage * self.tp_size + tp_rank

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    @property
    def sampler_rank(self) -> int:
        """The rank that samples tokens and broadcasts them (last stage, tp rank 0)."""
        return self.rank_of(self.num_stages - 1, 0)


def make_tp_groups(topo: Topology) -> TPGroup:
    """Create every stage's TP group (all ranks must create all groups, in order)."""
    mine = None
    for stage in range(topo.num_stages):
        ranks = [topo.rank_of(stage, t) for t in range(topo.tp_size)]
        group = dist.new_group(ranks) if topo.tp_size > 1 else None
        if stage == topo.stage:
            mine = group
    return TPGroup(tp_size=topo.tp_size, tp_rank=topo.tp_rank, group=mine)


def send_activation(x: torch.Tensor, dst: int) -> None:
    """Point-to-point in float32 (gloo has no bf16 send on every build); cast around it."""
    dist.send(x.float().contiguous(), dst=dst)


def recv_activation(shape: tuple[int, ...], src: int, dtype: torch.dtype,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    buf = torch.empty(shape, dtype=torch.float32, device=device)
    dist.recv(buf, src=src)
    return buf.to(dtype)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(target: str, payload: str, rank: int, world_size: int, port: int,
           out_dir: str) -> None:
    torch.set_num_threads(1)
    out = Path(out_dir)
    try:
        backend = "gloo"
        if str(json.loads(payload).get("device", "cpu")).startswith("cuda"):
            backend = "nccl"  # one GPU per rank
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size)
        module, func = target.split(":")
        result = getattr(importlib.import_module(module), func)(json.loads(payload), rank,
                                                                world_size)
        (out / f"result.{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()
    except BaseException:
        (out / f"error.{rank}.txt").write_text(traceback.format_exc())
        os._exit(1)


def run_spmd(target: str, payload: dict[str, Any], world_size: int,
             timeout_s: float = 600.0) -> list[Any]:
    """Run ``module:function(payload, rank, world_size)`` on ``world_size`` spawned gloo ranks;
    returns each rank's JSON result. A failing rank stops the others and raises its traceback."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="exegpt-spmd-") as out_dir:
        procs = [ctx.Process(target=_child, daemon=True,
                             args=(target, json.dumps(payload), r, world_size, port, out_dir))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        _wait(procs, Path(out_dir), timeout_s)
        return [json.loads((Path(out_dir) / f"result.{r}.json").read_text())
                for r in range(world_size)]


def _wait(procs: list[Any], out_dir: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(p.is_alive() for p in procs):
        failed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
        if failed or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    failed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    for p in procs:
        p.join(5)
    if failed:
        errors = sorted(out_dir.glob("error.*.txt"))
        detail = errors[0].read_text() if errors else f"exit codes {[p.exitcode for p in procs]}"
        raise RuntimeError(f"rank {failed[0]} of the local process group failed:\n{detail}")
    if alive:
        raise TimeoutError(f"local process group did not finish within {timeout_s:.0f} s")
