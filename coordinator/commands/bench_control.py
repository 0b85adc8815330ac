"""`exegpt bench control`: streamed tokens/s through the coordinator with the null model.

A local mesh (coordinator + encoders + decoders, real processes and sockets) serves N
concurrent streaming requests from one in-process AsyncClient. Reported per repeat: tokens/s
received by the client, StreamChunks (and tokens per chunk: the coordinator coalesces the
tokens a request gained since its last chunk whenever it falls behind), and CPU seconds per
process per 1k tokens, which says where the time goes. The machine may be shared: the numbers
are medians over repeats, and the CPU split is what to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

CLK_TCK = 100


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("control", help="control-plane tokens/s (null model)",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=64, help="concurrent streaming requests")
    p.add_argument("--tokens", type=int, default=1000, help="max_new_tokens per request")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--transport", choices=("ipc", "tcp"), default="ipc")
    p.add_argument("--decoders", type=int, default=1)
    p.add_argument("--model-shape", default="smollm2-135m")
    p.add_argument("--decode-cost-ms", type=float, default=0.0)
    p.add_argument("--stream-interval", type=int, default=1,
                   help="decoder publishes a sequence's tokens every N iterations")
    p.add_argument("--publish-interval-ms", type=float, default=1.0,
                   help="decoder merges iterations faster than this (0: every iteration)")
    p.set_defaults(func=run)


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def _self_cpu() -> float:
    return time.process_time()


async def _one_repeat(endpoint: str, args: argparse.Namespace) -> dict[str, float]:
    from common.client import AsyncClient

    prompt = list(range(1, args.prompt_len + 1))
    totals = {"tokens": 0, "chunks": 0}
    async with AsyncClient(endpoint, default_timeout_s=600) as client:
        async def stream() -> None:
            async with client.stream(prompt_ids=prompt, max_new_tokens=args.tokens) as s:
                async for chunk in s:
                    totals["tokens"] += len(chunk.tokens)
                    totals["chunks"] += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(stream() for _ in range(args.streams)))
        elapsed = time.perf_counter() - t0
    return {"tokens": totals["tokens"], "chunks": totals["chunks"], "seconds": elapsed}


def run(args: argparse.Namespace) -> int:
    import uvloop

    from coordinator.launch import LaunchSpec, LocalMesh, WorkerGroup

    runs = Path(tempfile.mkdtemp(prefix="exegpt-bench-"))
    spec = LaunchSpec(groups=(WorkerGroup("encoder", 1),
                              WorkerGroup("decoder", args.decoders, capacity=max(256,
                                                                                 args.streams))),
                      runs_path=runs, transport=args.transport, model_shape=args.model_shape,
                      decode_cost_ms=args.decode_cost_ms, stream_interval=args.stream_interval,
                      publish_interval_ms=args.publish_interval_ms)
    mesh = LocalMesh(spec)
    endpoint = mesh.start()
    print(f"bench control: {args.streams} streams x {args.tokens} tokens, {args.transport}, "
          f"{args.decoders} decoder(s), decode cost {args.decode_cost_ms} ms, stream interval "
          f"{args.stream_interval}, publish interval {args.publish_interval_ms} ms "
          f"(machine may be shared; median of {args.repeats})")
    rates = []
    try:
        for i in range(args.repeats):
            before = {c.name: _cpu_seconds(c.pid) for c in mesh.children}
            me = _self_cpu()
            rep = uvloop.run(_one_repeat(endpoint, args))
            cpu = {c.name: _cpu_seconds(c.pid) - before[c.name] for c in mesh.children}
            cpu["client"] = _self_cpu() - me
            rate = rep["tokens"] / rep["seconds"]
            rates.append(rate)
            split = ", ".join(f"{name} {sec * 1000 / rep['tokens'] * 1000:.1f}"
                              for name, sec in cpu.items())
            print(f"  repeat {i + 1}: {rate:,.0f} tokens/s ({rep['tokens']} tokens in "
                  f"{rep['seconds']:.2f} s, {rep['chunks']} chunks, "
                  f"{rep['tokens'] / max(1, rep['chunks']):.1f} tokens/chunk); "
                  f"CPU us/token: {split}")
    finally:
        mesh.stop()
    print(f"median: {statistics.median(rates):,.0f} tokens/s")
    return 0
