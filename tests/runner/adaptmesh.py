"""What the live-adaptation mesh tests share: the two workloads, the detector options, the
request driver (exactly-once bookkeeping) and the adapting mesh's LaunchSpec."""

from __future__ import annotations

import asyncio
import subprocess
import time
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


# --- the live re-layout mesh tests (test_relayout_{tp,waa_tp,t5}_mesh.py): an in-process
# coordinator, worker processes, a switch started through the adapter -------------------------

async def wait_serving(co: Any, runner: asyncio.Task, timeout_s: float = 120) -> None:
    """Until the in-process coordinator ``co`` (its ``run()`` task ``runner``) serves."""
    deadline = time.monotonic() + timeout_s
    while getattr(co, "members", None) is None or not co.members.serving:
        assert time.monotonic() < deadline and not runner.done(), "mesh not ready"
        await asyncio.sleep(0.1)


async def switch_now(co: Any, new: Any, reason: str, poll_s: float = 0.05) -> dict[str, Any]:
    """Start the adapter's re-layout to plan ``new`` now; wait until it is live (its cost)."""
    from coordinator import adapt_relayout

    target = adapt_relayout.relayout_target(co, co.adapter.plan, new)
    assert not isinstance(target, str), target
    before = len(co.adapter.switches)
    adapt_relayout.start(co.adapter, new, target, {"reason": reason, "t_fire": time.time()})
    deadline = time.monotonic() + 90
    while len(co.adapter.switches) == before:
        assert co.adapter.relayouting is not None, "the re-layout failed"
        assert time.monotonic() < deadline, co.pipeline.describe()
        await asyncio.sleep(poll_s)
    return co.adapter.switches[-1]


def reap(procs: list[subprocess.Popen[bytes]]) -> None:
    """Wait for the worker processes to exit (they do when the coordinator stops); kill
    the ones that do not within 15 s."""
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def assert_exactly_once(results: dict[str, list[int]], work: list[tuple[str, list[int], int]],
                        expected: list[list[int]]) -> None:
    """Every request answered once, with the reference's tokens."""
    assert {r: results.get(r) for r, _, _ in work} == {
        r: want for (r, _, _), want in zip(work, expected, strict=True)}
