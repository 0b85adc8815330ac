"""`exegpt bench transport`: KV-handoff bandwidth between two real processes.

Why: the encoder -> decoder KV handoff moves megabytes per request; the protocol must cost
little over raw ZeroMQ. Each trial sends N messages of one payload size from this process
to a receiver process (the encoder -> decoder shape: DEALER -> ROUTER like the workers, or
PUSH -> PULL), then waits for the receiver's ack; bandwidth = N * size / time, median over
repeats. Modes, all in the same run:

    protocol   KVHandoff with bf16 "k"/"v" torch tensors: encode, send (copy=False), recv
               (copy=False), strict decode, then the one copy into a preallocated torch
               destination (what a decoder does with its KV cache)
    raw        one raw frame of the same bytes, copy=False both ways, receiver touches nothing
    raw+copy   raw, plus the receiver copies the frame into a destination tensor the way
               the protocol's copy_into does (common.tensorframe.copy_bytes_into)
    memcpy     in-process torch copy of the same bytes (the memory-bandwidth ceiling)

Then the in-process CPU cost of each protocol step per message (build, encode, decode, copy),
hot and cache-cold: less sensitive to other load than the two-process numbers.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import struct
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from coordinator.commands._bench_transport_micro import run_micro

MODES = ("protocol", "raw", "raw+copy")
MIB = 1 << 20


@dataclass(frozen=True)
class Cell:
    """One timed batch: `count` messages of one mode and size (warmup cells are not kept)."""

    mode: str
    size_bytes: int
    count: int
    warmup: bool


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("transport", help="KV handoff bandwidth: protocol vs raw ZMQ",
                              description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes-mib", default="1,16", help="payload sizes in MiB (default 1,16)")
    p.add_argument("--transport", default="tcp,ipc", help="tcp (loopback), ipc, or both")
    p.add_argument("--sockets", choices=("dealer-router", "push-pull"), default="dealer-router")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per cell (median)")
    p.add_argument("--bytes-per-repeat-mib", type=int, default=256,
                   help="data sent per repeat (sets the message count per size)")
    p.add_argument("--json", help="also write the results to this file")
    p.set_defaults(func=run)


def _plan(sizes: list[int], repeats: int, per_repeat: int) -> list[Cell]:
    """Modes interleaved repeat by repeat, so load from other processes hits all alike."""
    cells = []
    for size in sizes:
        count = max(8, per_repeat // size)
        cells += [Cell(m, size, max(2, count // 4), True) for m in MODES]
        cells += [Cell(m, size, count, False) for _ in range(repeats) for m in MODES]
    return cells


def _kv_tensors(size_bytes: int) -> dict[str, Any]:
    """k and v, bf16, [layers=4, heads=2, seq, head_dim=64], together size_bytes."""
    import torch

    seq = size_bytes // 2 // 2 // (4 * 2 * 64)
    return {n: torch.randn(4, 2, seq, 64).to(torch.bfloat16) for n in ("k", "v")}


def _make_pair(ctx: Any, sockets: str, endpoint: str, bind: bool) -> Any:
    from common.sockets import make_socket

    kind = {("dealer-router", True): "ROUTER", ("dealer-router", False): "DEALER",
            ("push-pull", True): "PULL", ("push-pull", False): "PUSH"}[(sockets, bind)]
    args = {"bind": endpoint} if bind else {"connect": endpoint}
    return make_socket(ctx, kind, hwm=64, linger_ms=1000, **args)


def receiver_main(endpoint: str, ack_endpoint: str, sockets: str, cells_json: str) -> None:
    """The receiving process: binds (like a decoder's KV endpoint) and acks every cell."""
    import torch
    import zmq

    from common import protocol as P
    from common.sockets import make_socket
    from common.tensormem import copy_bytes_into

    torch.set_num_threads(1)
    cells = [Cell(**c) for c in json.loads(cells_json)]
    ctx = zmq.Context()
    sock = _make_pair(ctx, sockets, endpoint, bind=True)
    ack = make_socket(ctx, "PUSH", connect=ack_endpoint)
    skip = 1 if sockets == "dealer-router" else 0
    ack.send(b"up")
    dst: dict[tuple[str, int], Any] = {}  # destinations allocated once, like a KV cache
    gc.collect()  # not mid-measurement: the imports' pending full collection (all modes alike)
    for cell in cells:
        cpu0 = time.process_time()
        for _ in range(cell.count):
            frames = sock.recv_multipart(copy=False)[skip:]
            if cell.mode == "protocol":
                msg = P.decode(frames)
                for name, wt in msg.kv.tensors.items():
                    key = (name, cell.size_bytes)
                    if key not in dst:
                        dst[key] = torch.empty(wt.shape, dtype=torch.bfloat16)
                    wt.copy_into(dst[key])
            elif cell.mode == "raw+copy":
                key = ("raw", cell.size_bytes)
                if key not in dst:
                    dst[key] = torch.empty(cell.size_bytes, dtype=torch.uint8)
                copy_bytes_into(dst[key], frames[0].buffer)  # the copy copy_into makes
        ack.send(struct.pack("<d", time.process_time() - cpu0))
    sock.close()
    ack.close()
    ctx.term()


def _wait_ack(ack: Any, proc: Any, timeout_s: float = 120.0) -> bytes:
    """Wait for the receiver's ack, failing fast (not hanging) if the receiver died."""
    deadline = time.monotonic() + timeout_s
    while not ack.poll(100):
        if not proc.is_alive():
            raise RuntimeError(f"the receiver process exited with code {proc.exitcode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no ack from the receiver within {timeout_s:.0f}s")
    return ack.recv()


def _send_cells(
    sock: Any, ack: Any, proc: Any, cells: list[Cell]
) -> dict[tuple[str, int], list[float]]:
    """Send every cell; GB/s per kept cell, keyed by (mode, size)."""
    import torch

    from common import protocol as P

    payloads = {c.size_bytes: _kv_tensors(c.size_bytes) for c in cells}
    raws = {s: torch.cat([t.reshape(-1) for t in kv.values()]).view(torch.uint8).numpy()
            for s, kv in payloads.items()}
    out: dict[tuple[str, int], list[float]] = {}
    gc.collect()  # as in the receiver: startup garbage is not charged to whichever cell runs
    for cell in cells:
        tensors, raw = payloads[cell.size_bytes], raws[cell.size_bytes]
        seq_len = int(tensors["k"].shape[2])  # an encoder knows it (KVExport.seq_len)
        t0, cpu0 = time.perf_counter(), time.process_time()
        for i in range(cell.count):
            if cell.mode == "protocol":
                kv = P.KVPayload(f"r{i}", seq_len, 0, 4, 0, 2, 2, tensors)
                sock.send_multipart(P.encode(P.KVHandoff(
                    f"r{i}", "bench", 1, kv.seq_len, 16, P.Sampling(), kv)), copy=False)
            else:
                sock.send(raw, copy=False)
        (recv_cpu,) = struct.unpack("<d", _wait_ack(ack, proc))
        if not cell.warmup:
            wall, send_cpu = time.perf_counter() - t0, time.process_time() - cpu0
            stats = out.setdefault((cell.mode, cell.size_bytes), [])
            stats.append((cell.count * cell.size_bytes / wall / 1e9,
                          send_cpu / cell.count * 1e6, recv_cpu / cell.count * 1e6))
    return out


def _memcpy_gbps(size_bytes: int, repeats: int) -> list[float]:
    import torch

    src = torch.randint(0, 255, (size_bytes,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    count = max(8, (256 * MIB) // size_bytes)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(count):
            dst.copy_(src)
        out.append(count * size_bytes / (time.perf_counter() - t0) / 1e9)
    return out


def _run_transport(transport: str, sockets: str, cells: list[Cell]) -> dict[tuple, list]:
    import multiprocessing as mp
    import tempfile

    import zmq

    from common.sockets import bound_endpoint, make_socket

    tmp = tempfile.mkdtemp(prefix="exegpt-bench-")
    ctx = zmq.Context()
    ack = make_socket(ctx, "PULL", bind=f"ipc://{tmp}/ack.sock")
    if transport == "tcp":
        probe = make_socket(ctx, "PULL", bind="tcp://127.0.0.1:0")
        endpoint = bound_endpoint(probe)  # pick a free port, then hand it to the receiver
        probe.close(linger=0)
        time.sleep(0.05)
    else:
        endpoint = f"ipc://{tmp}/kv.sock"
    proc = mp.get_context("spawn").Process(
        target=receiver_main,
        args=(endpoint, bound_endpoint(ack), sockets, json.dumps([asdict(c) for c in cells])))
    proc.start()
    try:
        _wait_ack(ack, proc)  # the receiver is bound
        sock = _make_pair(ctx, sockets, endpoint, bind=False)
        results = _send_cells(sock, ack, proc, cells)
        sock.close()
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
        ack.close(linger=0)
        ctx.term()
    return results


def hardware() -> dict[str, Any]:
    import os
    import platform

    import torch
    import zmq

    cpu = platform.processor() or "unknown"
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
            "kernel": platform.release()}


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(1)
    try:
        if args.repeats < 1 or args.bytes_per_repeat_mib < 1:
            raise ValueError("--repeats and --bytes-per-repeat-mib must be >= 1")
        sizes = [int(float(s) * MIB) for s in args.sizes_mib.split(",")]
        transports = [t.strip() for t in args.transport.split(",")]
        if any(t not in ("tcp", "ipc") for t in transports) or min(sizes) < 4096:
            raise ValueError("transports must be tcp/ipc and sizes >= 4 KiB")
    except ValueError as exc:
        print(f"exegpt bench transport: {exc}", file=sys.stderr)
        return 2
    hw = hardware()
    print("hardware: " + ", ".join(f"{k}={v}" for k, v in hw.items()))
    print(f"sockets: {args.sockets}; medians of {args.repeats} repeats; GB/s = 1e9 bytes/s; "
          "the machine may be shared, so compare ratios within this run")
    cells = _plan(sizes, args.repeats, args.bytes_per_repeat_mib * MIB)
    rows = []
    for transport in transports:
        try:
            results = _run_transport(transport, args.sockets, cells)
        except RuntimeError as exc:
            print(f"exegpt bench transport: {exc}", file=sys.stderr)
            return 1
        rows += [_row(transport, size, results, args.repeats) for size in sizes]
    _print_table(rows)
    micro = run_micro(sizes, args.repeats)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"hardware": hw, "sockets": args.sockets, "rows": rows,
                       "cells": [asdict(c) for c in cells], "in_process": micro}, f, indent=2)
    return 0


def _row(transport: str, size: int, results: dict, repeats: int) -> dict[str, Any]:
    """Medians per mode; ratios are medians of per-repeat ratios (modes ran interleaved)."""
    row: dict[str, Any] = {"transport": transport, "size_mib": size / MIB}
    for m in MODES:
        cells = results[(m, size)]
        row[m] = statistics.median(c[0] for c in cells)
        row[f"{m}_send_cpu_us"] = statistics.median(c[1] for c in cells)
        row[f"{m}_recv_cpu_us"] = statistics.median(c[2] for c in cells)
    row["memcpy"] = statistics.median(_memcpy_gbps(size, repeats))
    proto, raw, raw_copy = (results[(m, size)] for m in MODES)
    for key, ref in (("protocol_vs_raw", raw), ("protocol_vs_raw_copy", raw_copy)):
        row[key] = statistics.median(p[0] / r[0] for p, r in zip(proto, ref, strict=True))
    return row


def _print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'transport':<9} {'size':>7} {'protocol':>9} {'raw':>9} {'raw+copy':>9} "
            f"{'memcpy':>9} {'proto/raw':>9} {'proto/raw+copy':>14}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['transport']:<9} {r['size_mib']:>5g}Mi {r['protocol']:>7.2f}GB "
              f"{r['raw']:>7.2f}GB {r['raw+copy']:>7.2f}GB {r['memcpy']:>7.2f}GB "
              f"{r['protocol_vs_raw']:>9.0%} {r['protocol_vs_raw_copy']:>14.0%}")
    print("\nCPU time per message (µs, whole process incl. ZMQ I/O thread), send / receive:")
    for r in rows:
        cpu = "  ".join(f"{m} {r[m + '_send_cpu_us']:.0f}/{r[m + '_recv_cpu_us']:.0f}"
                        for m in MODES)
        print(f"{r['transport']:<9} {r['size_mib']:>5g}Mi  {cpu}")
