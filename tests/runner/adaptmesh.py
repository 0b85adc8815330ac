"""What the live-adaptation mesh tests share: the two workloads, the detector options, the
request driver (exactly-once bookkeeping) and the adapting mesh's LaunchSpec."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np

from common.client import AsyncClient
from coordinator.launch import LaunchSpec
from coordinator.plan_launch import plan_fields
from coordinator.planner.workload import parse_workload

SHORT = "name=short;in=normal:8,3,16;out=normal:4,1,8"
LONG = "name=long;in=normal:40,6,56;out=normal:16,4,24"
OPTIONS = ("window=48,min_samples=24,eval_every=4,confirm=2,alpha=1e-3,min_dwell_s=1,"
           "min_dwell_requests=16,drain_timeout_s=0")


def adapt_spec(plan: Any, plan_path: Path, prof_path: Path, model: Path, tmp: Path,
               capacity: int) -> LaunchSpec:
    """A float32 ipc mesh serving ``plan`` with ``--adapt`` (re-planning with ``prof_path``)."""
    from coordinator.commands.serve import model_fields

    return LaunchSpec(**plan_fields(plan, null_model=False, decoder_capacity=capacity),
                      runs_path=tmp / "runs", transport="ipc", dtype="float32",
                      heartbeat_interval_s=0.25, **model_fields(str(model)),
                      coordinator_args=("--plan", str(plan_path), "--profile", str(prof_path),
                                        "--adapt", "--adapt-options", OPTIONS))


def draw_work(spec: str, num: int, seed: int, prefix: str) -> list[tuple[str, list[int], int]]:
    """``num`` (req_id, prompt ids, max_new_tokens) drawn from the workload ``spec``."""
    rng = np.random.default_rng(seed)
    ins, outs = parse_workload(spec).sample(rng, num)
    return [(f"{prefix}{i}", [int(t) for t in rng.integers(4, 128, int(n))], int(s))
            for i, (n, s) in enumerate(zip(ins, outs, strict=True))]


async def send_work(client: AsyncClient, work: list[tuple[str, list[int], int]],
                    results: dict[str, list[int]], stop: asyncio.Event | None = None,
                    concurrency: int = 8, times: dict[str, Any] | None = None) -> int:
    """Send ``work`` with at most ``concurrency`` in flight (until ``stop``); a request
    answered twice fails the test. Returns how many were sent."""
    gate = asyncio.Semaphore(concurrency)

    async def one(req_id: str, prompt: list[int], n: int) -> None:
        try:
            res = await client.generate(prompt_ids=prompt, max_new_tokens=n, req_id=req_id,
                                        timeout_s=120)
            assert req_id not in results, f"{req_id} answered twice"
            results[req_id] = list(res.tokens)
            if times is not None:
                times[req_id] = res.lifecycle
        finally:
            gate.release()

    tasks = []
    for req_id, prompt, n in work:
        if stop is not None and stop.is_set():
            break
        await gate.acquire()
        tasks.append(asyncio.create_task(one(req_id, prompt, n)))
    await asyncio.gather(*tasks)
    return len(tasks)


async def adapt_stats(client: AsyncClient) -> dict:
    """The coordinator's ``adapt`` stats (detector state, switches)."""
    return (await client.stats()).stats["adapt"]


async def watch_switch(client: AsyncClient, stop: asyncio.Event) -> None:
    """Set ``stop`` once the coordinator reports its first plan switch."""
    while not stop.is_set():
        if (await adapt_stats(client))["switches"]:
            stop.set()
        await asyncio.sleep(0.2)
