"""Run one plan on a local mesh and bring back every request's lifecycle.

The path is the one `exegpt serve --plan` takes: `coordinator.plan_launch.plan_fields` turns
the plan into LaunchSpec fields (so a plan this build cannot run raises the runner's
ValueError, reported by the caller), `LocalMesh` starts real processes, and the requests go
through the client SDK over the real sockets, all at once (saturated, like the planner's
closed form). A few short warm-up requests run first: the first pass of a torch process pays
one-off costs (allocator, kernel selection) no steady state has.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import protocol as P
from coordinator.bench.measure import RequestRecord
from coordinator.bench.workset import BenchRequest

WARMUP_REQUESTS = 2
WARMUP_PROMPT = 8
WARMUP_TOKENS = 2
STATS_SETTLE_S = 1.2  # > two worker heartbeats (0.5 s): the stats carry the run's last loads


@dataclass(frozen=True)
class Target:
    """What the mesh serves: the real model (``model_fields`` of serve) or the null model."""

    null_model: bool
    model_shape: str  # the preset sizing the null model (and the coordinator's vocabulary)
    fields: dict[str, Any] = field(default_factory=dict)  # model, model_config, tokenizer
    dtype: str = "bfloat16"

    @property
    def vocab_size(self) -> int:
        from common.models.config import ModelConfig

        if self.fields.get("model_config"):
            return int(self.fields["model_config"]["vocab_size"])
        return ModelConfig.preset(self.model_shape).vocab_size


def launch_spec(plan: Any, target: Target, runs_path: Path) -> Any:
    """The LaunchSpec that runs ``plan`` (ValueError: this build cannot run it)."""
    from coordinator.launch import LaunchSpec
    from coordinator.plan_launch import plan_fields

    fields = plan_fields(plan, null_model=target.null_model, decoder_capacity=256)
    return LaunchSpec(**target.fields, **fields, dtype=target.dtype, runs_path=runs_path,
                      model_shape=target.model_shape, drain_timeout_s=5.0)


def submit_for(request: BenchRequest, natural_eos: bool, timeout_s: float) -> P.Submit:
    """Greedy; the drawn output length enforced by ignoring EOS unless ``natural_eos``."""
    sampling = P.Sampling(temperature=0.0, ignore_eos=not natural_eos)
    return P.Submit(uuid.uuid4().hex, None, request.prompt_ids, request.output_len, sampling,
                    False, timeout_s, False)


async def _one(client: Any, submit: P.Submit, request: BenchRequest,
               done: Callable[[], None]) -> RequestRecord:
    from common.client import AsyncStream
    from common.errors import ExegptError

    try:
        async with AsyncStream(client, submit) as stream:
            async for _ in stream:
                pass
        result = stream.result
        assert result is not None
    except ExegptError as exc:
        done()
        return RequestRecord(len(request.prompt_ids), request.output_len, 0, None,
                             f"{type(exc).__name__}: {exc}")
    done()
    life = result.lifecycle
    return RequestRecord(len(request.prompt_ids), request.output_len, len(result.tokens),
                         result.finish_reason, None, life.t_arrival, life.t_encode_start,
                         life.t_encode_end, life.t_first_token, life.t_finish,
                         tuple(life.t_tokens))


async def send_all(endpoint: str, requests: Sequence[BenchRequest], *, natural_eos: bool,
                   timeout_s: float, done: Callable[[], None] = lambda: None
                   ) -> tuple[list[RequestRecord], dict[str, Any]]:
    """Every request at once; (records in request order, the coordinator's stats after)."""
    from common.client import AsyncClient

    async with AsyncClient(endpoint, default_timeout_s=timeout_s) as client:
        records = await asyncio.gather(*(
            _one(client, submit_for(r, natural_eos, timeout_s), r, done) for r in requests))
        await asyncio.sleep(STATS_SETTLE_S)  # the workers' loads come with their heartbeats
        try:
            stats = dict((await client.stats(timeout_s=10.0)).stats)
        except Exception as exc:  # noqa: BLE001 - stats are context; the records stand alone
            stats = {"error": f"{type(exc).__name__}: {exc}"}
    return list(records), stats


def warmup_requests(vocab_size: int) -> list[BenchRequest]:
    low = min(100, vocab_size // 2)
    return [BenchRequest(tuple(range(low, low + WARMUP_PROMPT)), WARMUP_TOKENS)
            for _ in range(WARMUP_REQUESTS)]


@dataclass
class MeshRun:
    """The records of each repeat of one plan, plus where the mesh logged."""

    repeats: list[list[RequestRecord]]
    stats: list[dict[str, Any]]
    run_id: str
    startup_s: float
    load_avg: list[float] = field(default_factory=list)  # 1-min load at each repeat's end


def run_plan(plan: Any, requests: Sequence[BenchRequest], target: Target, *, runs_path: Path,
             repeats: int, natural_eos: bool, timeout_s: float, startup_timeout_s: float,
             done: Callable[[], None] = lambda: None) -> MeshRun:
    """Start the plan's mesh, warm it up, send ``requests`` ``repeats`` times, stop it."""
    from coordinator.launch import LocalMesh

    spec = launch_spec(plan, target, runs_path)
    mesh = LocalMesh(spec, startup_timeout_s=startup_timeout_s)
    started = time.monotonic()
    endpoint = mesh.start()
    startup = time.monotonic() - started
    out = MeshRun([], [], spec.run_id, startup)
    try:
        asyncio.run(send_all(endpoint, warmup_requests(target.vocab_size),
                             natural_eos=False, timeout_s=timeout_s))
        for _ in range(repeats):
            records, stats = asyncio.run(send_all(endpoint, requests, natural_eos=natural_eos,
                                                  timeout_s=timeout_s, done=done))
            out.repeats.append(records)
            out.stats.append(stats)
            out.load_avg.append(os.getloadavg()[0])
    finally:
        mesh.stop(grace_s=30.0 if target.fields.get("model") else 5.0)
    return out
