"""Adaptation end to end: null-model meshes whose traffic shifts from short to long outputs.

Plans for 2 analytic A40s (SmolLM2-135M shapes), short outputs, a 0.3 s bound: WAA-C
(encoder + decoder worker, B_E = 512: far from the bound) and RRA (two stage workers, B_E 376,
N_D 5). Long outputs make the p99-length request slower, so the re-plan must change the knobs
(WAA: a much smaller B_E; RRA: a longer cycle, larger N_D) on the same workers. The meshes are
the null model (their own costs), so this tests the control loop, not the profile's accuracy.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from common.backend import null_tokens
from common.client import AsyncClient
from common.models.config import ModelConfig
from coordinator.launch import LaunchSpec, LocalMesh
from coordinator.plan_launch import plan_fields
from coordinator.planner.analytic import parse_profile_arg
from coordinator.planner.plan import Plan
from coordinator.planner.planning import make_plan
from coordinator.planner.workload import parse_workload

ROOT = Path(__file__).resolve().parents[2]
PROFILE = "analytic:a40:smollm2-135m"
SHORT = "name=short;in=normal:64,32,128;out=normal:8,3,20"
LONG = "name=long;in=normal:64,32,128;out=normal:32,17,80"
OPTIONS = "window=128,min_samples=48,eval_every=8,min_dwell_s=1,min_dwell_requests=32"
STATIONARY = 300  # short requests before the shift: no switch allowed
SHIFT_LIMIT = 1200  # long requests sent at most while waiting for the switch
AFTER = 60  # long requests after the switch: served with the new knobs
DETECT_BOUND = 400  # long requests before the detector fires (measured: 100-300, see docs)


@dataclass(frozen=True)
class Served:
    mesh: LocalMesh
    plan: Plan
    vocab: int


# WAA-C: encoder + decoder worker (tiny-llama-sized null model: the plan's layers do not
# matter to WAA workers); RRA: two stage workers holding the plan's SmolLM2 layer ranges
MESHES = {"waa-c": "tiny-llama", "rra": "smollm2-135m"}


@pytest.fixture(scope="module", params=list(MESHES))
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[Served]:
    policy, shape = request.param, MESHES[request.param]
    plan = make_plan(parse_workload(SHORT), parse_profile_arg(PROFILE), 2, 0.3, policy=policy)
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    path.write_text(plan.to_json())
    fields = plan_fields(plan, null_model=True, decoder_capacity=256)
    spec = LaunchSpec(**fields, runs_path=tmp_path_factory.mktemp("runs"), transport="ipc",
                      model_shape=shape, decode_cost_ms=1.0, heartbeat_interval_s=0.25,
                      coordinator_args=("--plan", str(path), "--profile", PROFILE, "--adapt",
                                        "--adapt-options", OPTIONS))
    local = LocalMesh(spec, startup_timeout_s=60)
    local.start()
    yield Served(local, plan, ModelConfig.preset(shape).vocab_size)
    assert local.stop() == []  # the planner process too: nothing needed SIGKILL
    assert all(c.poll() == 0 for c in local.children), [c.describe_exit()
                                                         for c in local.children]


def _requests(spec: str, num: int, seed: int, prefix: str,
              vocab: int) -> list[tuple[str, list[int], int]]:
    rng = np.random.default_rng(seed)
    ins, outs = parse_workload(spec).sample(rng, num)
    return [(f"{prefix}{i}", [int(t) for t in rng.integers(0, vocab, int(n))], int(s))
            for i, (n, s) in enumerate(zip(ins, outs, strict=True))]


async def _run(client: AsyncClient, work: list[tuple[str, list[int], int]],
               results: dict[str, tuple[int, ...]], stop: asyncio.Event | None = None,
               concurrency: int = 48) -> int:
    """Send ``work`` keeping ``concurrency`` in flight; returns how many were sent."""
    gate = asyncio.Semaphore(concurrency)

    async def one(req_id: str, prompt: list[int], n: int) -> None:
        try:
            res = await client.generate(prompt_ids=prompt, max_new_tokens=n, req_id=req_id)
            assert req_id not in results, f"{req_id} answered twice"
            results[req_id] = res.tokens
        finally:
            gate.release()

    tasks, sent = [], 0
    for req_id, prompt, n in work:
        if stop is not None and stop.is_set():
            break
        await gate.acquire()
        tasks.append(asyncio.create_task(one(req_id, prompt, n)))
        sent += 1
    await asyncio.gather(*tasks)
    return sent


async def _adapt_stats(client: AsyncClient) -> dict:
    return (await client.stats()).stats["adapt"]


async def _watch(client: AsyncClient, stop: asyncio.Event) -> None:
    while not stop.is_set():
        if (await _adapt_stats(client))["switches"]:
            stop.set()
        await asyncio.sleep(0.2)


def _check_tokens(work: list[tuple[str, list[int], int]], results: dict[str, tuple[int, ...]],
                  num: int, vocab: int) -> None:
    """``num`` requests of ``work`` were answered, each with its null-model tokens."""
    assert len(work) == num
    for req_id, prompt, n in work:
        assert list(results[req_id]) == null_tokens(prompt, n, vocab), req_id


def test_shift_to_long_outputs_switches_knobs_and_every_request_completes(
        served: Served) -> None:
    local, plan, vocab = served.mesh, served.plan, served.vocab
    short = _requests(SHORT, STATIONARY, 1, "s", vocab)
    long = _requests(LONG, SHIFT_LIMIT + AFTER, 2, "l", vocab)

    async def scenario() -> tuple[dict, dict, int, int]:
        results: dict[str, tuple[int, ...]] = {}
        async with AsyncClient(local.client_endpoint, default_timeout_s=60) as client:
            for _ in range(300):  # the planner process warms up (spawn + imports) first
                if (await _adapt_stats(client))["planner_warm_s"] is not None:
                    break
                await asyncio.sleep(0.2)
            await _run(client, short, results)
            stationary = await _adapt_stats(client)
            _check_tokens(short, results, len(short), vocab)
            switched = asyncio.Event()
            watcher = asyncio.create_task(_watch(client, switched))
            sent = await _run(client, long[:SHIFT_LIMIT], results, stop=switched)
            await asyncio.wait_for(watcher, timeout=60)
            after = await _run(client, long[SHIFT_LIMIT:], results)
            full = (await client.stats()).stats
        answered = [r for r in long[:sent] + long[SHIFT_LIMIT:] if r[0] in results]
        _check_tokens(answered, results, len(results) - STATIONARY, vocab)
        assert len(answered) == sent + after and after == AFTER
        return stationary, full, sent, len(results)

    stationary, full, sent, total = asyncio.run(scenario())
    final = full["adapt"]
    assert stationary["switches"] == [] and stationary["detector"]["state"] in ("stable",
                                                                                "suspect")
    assert total == STATIONARY + sent + AFTER  # every request answered exactly once
    switch = final["switches"][0]
    assert switch["old"]["B_E"] == plan.B_E and final["knobs"]["B_E"] == final["live"]["B_E"]
    if plan.policy == "waa-c":  # the long requests' decode rounds: a smaller B_E
        assert switch["new"]["B_E"] < plan.B_E and final["knobs"]["B_E"] < plan.B_E
    else:  # rra: encode less often (longer cycles); every stream runs the new B and N_D
        assert switch["old"]["N_D"] == plan.N_D < switch["new"]["N_D"]
        assert final["live"]["streams"] == [{"batch": final["knobs"]["B_E"],
                                             "n_d": final["knobs"]["N_D"]}] * plan.microbatches
    assert "output" in switch["reason"]
    # stats compare with the plan switched to; the switches are listed there too
    assert full["plan"]["B_E"] == final["knobs"]["B_E"]
    assert [s["new"] for s in full["plan_switches"]] == [s["new"] for s in final["switches"]]
    assert full["vs_plan"]["since"] == pytest.approx(final["switches"][-1]["t"])
    if plan.policy == "rra":  # the pipeline reports the live knobs, not the launch flags
        assert (full["pipeline"]["B"], full["pipeline"]["N_D"]) == (
            final["knobs"]["B_E"], final["knobs"]["N_D"])
        assert full["pipeline"]["launch"] == {"B": plan.B_E, "N_D": plan.N_D}
    # fired within DETECT_BOUND requests of the shift (the arrival count includes the shift)
    assert 0 < switch["detect_arrival"] - STATIONARY <= DETECT_BOUND
    print(f"\nfired after {switch['detect_arrival'] - STATIONARY} long requests, switched "
          f"after {sent}: {json.dumps(switch)}")
    log = local.spec.run_dir / "coordinator.jsonl"
    events = [json.loads(line) for line in Path(log).read_text().splitlines() if line.strip()]
    names = [e.get("event") for e in events]
    assert "drift_detected" in names and "plan_switch" in names


def test_plan_observed_shows_the_window_beside_the_plan(served: Served) -> None:
    """`exegpt plan --workload observed --connect EP` while long outputs are served."""
    local = served.mesh
    work = _requests(LONG, 80, 3, "o", served.vocab)

    async def send() -> None:
        async with AsyncClient(local.client_endpoint, default_timeout_s=60) as client:
            await _run(client, work, {})

    asyncio.run(send())
    out = subprocess.run([sys.executable, "-m", "coordinator.cli", "plan", "--workload",
                          "observed", "--connect", local.client_endpoint, "--profile", PROFILE,
                          "--workers", "2", "--latency-bound", "0.3", "--policy",
                          served.plan.policy],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "output mean" in text and "log-rank" in text and "plan for the observed" in text
    row = next(line for line in text.splitlines() if "output mean" in line).split()
    planned, observed = float(row[2]), float(row[3])
    assert 24 < observed < 40  # the window holds long outputs (mean 32)
    # "planned" is the law of the plan now served: the launch plan's (mean 8), or, after the
    # module's earlier shift test, the switched plan's, made from a window like this one
    assert 6 < planned < 40
    bad = subprocess.run([sys.executable, "-m", "coordinator.cli", "plan", "--workload",
                          "observed"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode == 2 and "--connect" in bad.stderr
