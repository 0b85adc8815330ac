"""Communication costs by bytes: TP all-reduce (gloo) and stage/KV transfers (ZeroMQ).

all-reduce   the engine's own ``TPGroup.all_reduce`` on a tensor of the profile dtype (bf16 is
             widened to float32 for gloo, as in the engine), on the real gloo group of tp_size
             local processes; the slowest rank's median counts.
kv_handoff   encoder -> decoder: a real ``KVHandoff`` message (``KVPayload`` with bf16 "k"/"v"
             tensors shaped like the model's KV) encoded by ``common.protocol``, sent PUSH ->
             PULL through ``common.sockets``, strictly decoded, then copied into a
             preallocated destination (the one copy into the decoder's KV cache).
stage_send   stage -> stage activations ``[tokens, hidden]``: one tensor framed by
             ``common.tensorframe`` (msgpack body + raw frame, zero-copy both ways).

One-way time of an N-byte transfer = round trip (message, then a tiny ack back) minus half the
round trip of a tiny message, measured in the same run; medians over repeats.
"""

from __future__ import annotations

import time
from typing import Any

import msgpack
import torch
import torch.distributed as dist
import zmq

from common.models.config import ModelConfig
from common.profiling.grid import Grid
from common.profiling.timing import Group, ProgressFile, TimedTP, run_cell
from common.protocol import KVHandoff, KVPayload, Sampling, decode
from common.sockets import bound_endpoint, make_socket, send_msg
from common.tensorframe import DEFAULT_INLINE_THRESHOLD, decode_tensor, encode_tensor

ACT, STOP, ACK = b"act", b"stop", b"ack"


def measure_allreduce(tp: TimedTP, grid: Grid, dtype: torch.dtype, group: Group,
                      progress: ProgressFile) -> list[dict[str, Any]]:
    rows = []
    item = torch.tensor([], dtype=dtype).element_size()
    for nbytes in grid.allreduce_bytes:
        src = torch.randn(max(nbytes // item, 1)).to(dtype)
        x = src.clone()

        def step(x: torch.Tensor = x) -> dict[str, float]:
            t0 = time.perf_counter()
            tp.all_reduce(x)
            return {"t": time.perf_counter() - t0}

        t = run_cell(step, grid.timing, group, reset=lambda x=x, src=src: x.copy_(src))["t"]
        rows.append({"op": "allreduce", "tp": tp.tp_size, "batch": 0, "seq_len": 0,
                     "tokens": 0, "bytes": src.numel() * item, "time_s": t})
        progress.advance(label=f"tp={tp.tp_size} all-reduce {nbytes} B")
    return rows


# ---- transport (two processes: rank 0 = sender / encoder, rank 1 = receiver / decoder) -------
def _exchange_ports(ctx: zmq.Context, rank: int) -> tuple[zmq.Socket, zmq.Socket]:
    """Each rank binds one PULL on loopback; the ports travel over gloo; each connects a PUSH."""
    pull = make_socket(ctx, "PULL", bind="tcp://127.0.0.1:*", hwm=4)
    port = int(bound_endpoint(pull).rsplit(":", 1)[1])
    ports = [torch.zeros(1, dtype=torch.int64) for _ in range(2)]
    dist.all_gather(ports, torch.tensor([port], dtype=torch.int64))
    peer = int(ports[1 - rank].item())
    push = make_socket(ctx, "PUSH", connect=f"tcp://127.0.0.1:{peer}", hwm=4)
    return pull, push


def _receive_loop(pull: zmq.Socket, push: zmq.Socket) -> None:
    dest: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
    while True:
        frames = pull.recv_multipart(copy=False)
        head = frames[0].bytes
        if head == STOP:
            return
        if head == ACT:
            body = msgpack.unpackb(frames[1].buffer)
            bufs = [memoryview(f.buffer) for f in frames]
            used = [True, True] + [False] * (len(frames) - 2)
            decode_tensor(body["hidden"], bufs, used, "hidden", 8).as_torch()
        else:
            msg = decode(frames)
            for name, wt in msg.kv.tensors.items():
                key = (name, wt.shape)
                if key not in dest:
                    dest[key] = torch.empty(wt.shape, dtype=wt.as_torch().dtype)
                wt.copy_into(dest[key])
        push.send(ACK)


def _act_frames(x: torch.Tensor) -> list[Any]:
    frames: list[Any] = []
    entry = encode_tensor(x, frames, 2, DEFAULT_INLINE_THRESHOLD)
    return [ACT, msgpack.packb({"hidden": entry}), *frames]


def _kv_message(cfg: ModelConfig, nbytes: int, dtype: torch.dtype) -> KVHandoff:
    item = torch.tensor([], dtype=dtype).element_size()
    per_token = cfg.kv_heads * cfg.head_dim * item
    seq = max(1, nbytes // (2 * per_token))
    k = torch.zeros(1, cfg.kv_heads, seq, cfg.head_dim, dtype=dtype)
    payload = KVPayload(req_id="profile", seq_len=seq, layer_start=0, layer_end=1,
                        head_start=0, head_end=cfg.kv_heads, num_kv_heads=cfg.kv_heads,
                        tensors={"k": k, "v": k.clone()})
    return KVHandoff(req_id="profile", encoder_id="profiler", first_token=0, prompt_len=seq,
                     max_new_tokens=1, sampling=Sampling(), kv=payload)


def _round_trip(push: zmq.Socket, pull: zmq.Socket, send: Any) -> float:
    t0 = time.perf_counter()
    send()
    pull.recv()
    return time.perf_counter() - t0


def _send_side(cfg: ModelConfig, grid: Grid, dtype: torch.dtype, pull: zmq.Socket,
               push: zmq.Socket, progress: ProgressFile) -> list[dict[str, Any]]:
    group = Group()
    tiny = torch.zeros(1, dtype=dtype)

    def timed(send: Any) -> float:
        def step() -> dict[str, float]:
            rtt = _round_trip(push, pull, send)
            tiny_rtt = _round_trip(push, pull, lambda: push.send_multipart(_act_frames(tiny),
                                                                           copy=False))
            return {"one_way": rtt - tiny_rtt / 2}

        return max(run_cell(step, grid.timing, group)["one_way"], 0.0)

    rows = []
    item = tiny.element_size()
    for nbytes in grid.transport_bytes:
        x = torch.zeros(max(nbytes // (item * cfg.hidden_size), 1), cfg.hidden_size, dtype=dtype)
        t = timed(lambda x=x: push.send_multipart(_act_frames(x), copy=False))
        rows.append(_byte_row("stage_send", x.numel() * item, t))
        msg = _kv_message(cfg, nbytes, dtype)
        t = timed(lambda msg=msg: send_msg(push, msg))
        kv_bytes = sum(t.numel() * item for t in msg.kv.tensors.values())
        rows.append(_byte_row("kv_handoff", kv_bytes, t))
        progress.advance(label=f"transport {nbytes} B")
    push.send(STOP)
    return rows


def _byte_row(op: str, nbytes: int, time_s: float) -> dict[str, Any]:
    return {"op": op, "tp": 1, "batch": 0, "seq_len": 0, "tokens": 0, "bytes": nbytes,
            "time_s": time_s}


def measure_transport(cfg: ModelConfig, grid: Grid, dtype: torch.dtype, rank: int,
                      progress: ProgressFile) -> list[dict[str, Any]]:
    """Rank 0 sends and times; rank 1 receives, decodes, copies and acks."""
    ctx = zmq.Context()
    pull, push = _exchange_ports(ctx, rank)
    try:
        if rank == 1:
            _receive_loop(pull, push)
            return []
        return _send_side(cfg, grid, dtype, pull, push, progress)
    finally:
        pull.close(0)
        push.close(0)
        ctx.term()


ROW_KEY = ("op", "tp", "batch", "seq_len", "tokens", "bytes")


def slowest_rank_rows(rows_per_rank: list[list[dict[str, Any]]],
                      key: tuple[str, ...] = ROW_KEY) -> list[dict[str, Any]]:
    """Merge the ranks' rows: the slowest rank's time per row (a TP step waits for it)."""
    merged: dict[tuple, dict[str, Any]] = {}
    for rows in rows_per_rank:
        for row in rows:
            k = tuple(row[f] for f in key)
            if k not in merged or row["time_s"] > merged[k]["time_s"]:
                merged[k] = row
    return list(merged.values())
