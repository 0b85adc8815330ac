"""Soak: a null-model mesh under a steady stream of concurrent clients while every role is
SIGKILLed and restarted in turn; reports requests sent / completed / errored / lost,
duplicated and wrong tokens, and the recovery time after each kill.

    python -m tests.mesh.soak --minutes 10            # WAA for half, a 2-stage RRA plan after
    python -m tests.mesh.soak --minutes 2 --policy waa --json soak.json

Roles killed (one every ``--every`` seconds, round robin): WAA mesh (2 encoders, decoder dec0,
decoder group dec1 with tp_size 2): an encoder, a decoder, TP rank dec1.r1 (the coordinator
drops the whole group; rank 0 stops), the coordinator (restarted on the same endpoints);
pipeline mesh (2 stages): stage 1, the coordinator. A killed worker is restarted after
``--restart-after`` seconds (what a supervisor does), the coordinator at once.

Definitions. *completed*: a Result whose tokens equal the null model's undisturbed output.
*errored*: a typed error (worker_lost, unavailable incl. CoordinatorLost, ...): the client
knows and may retry. *lost*: neither within the request's timeout (a hang): must be 0.
*duplicated*: stream tokens at an index the client already had (read before the SDK's
de-duplication): must be 0. *recovery*: kill -> the first request submitted after the kill
that completes (``first_ok_s``), and kill -> every worker READY again (``ready_s``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import protocol as P
from common.backend import null_tokens
from common.client import AsyncClient, AsyncStream, submit_message
from common.errors import ServerError, Timeout
from common.procs import StartupError
from coordinator.launch import LaunchSpec, LocalMesh, WorkerGroup
from tests.mesh.meshctl import group_of, kill, restart_coordinator, restart_workers, wait_exit

VOCAB = 256
REQUEST_TIMEOUT_S = 30.0


class CountingStream(AsyncStream):
    """Counts tokens the wire repeats (index below what the client has) before the SDK
    drops them."""

    duplicated = 0

    def _accept(self, msg: P.Message) -> P.StreamChunk | None:
        if isinstance(msg, P.StreamChunk) and msg.index < self._num_tokens:
            CountingStream.duplicated += min(len(msg.tokens), self._num_tokens - msg.index)
        return super()._accept(msg)


@dataclass
class Tally:
    sent: int = 0
    completed: int = 0
    errored: Counter = field(default_factory=Counter)
    lost: int = 0
    wrong: int = 0
    ok_times: list[tuple[float, float]] = field(default_factory=list)  # (submitted, done)


@dataclass
class Kill:
    role: str
    victim: str
    t: float
    first_ok_s: float | None = None
    ready_s: float | None = None
    errors: int = 0  # requests answered with an error in the 15 s after the kill


async def one_request(client: AsyncClient, rng: random.Random, tally: Tally) -> None:
    prompt = tuple(rng.randrange(VOCAB) for _ in range(rng.randint(1, 24)))
    max_new = rng.randint(10, 120)
    stream = CountingStream(client, submit_message(prompt_ids=prompt, max_new_tokens=max_new,
                                                   timeout_s=REQUEST_TIMEOUT_S))
    tally.sent += 1
    start = time.monotonic()
    try:
        async for _ in stream:
            pass
    except Timeout:
        tally.lost += 1
        return
    except ServerError as exc:
        tally.errored[type(exc).__name__] += 1
        tally.ok_times.append((start, -time.monotonic()))  # negative: an error at that time
        await asyncio.sleep(0.2)  # a client backs off before retrying
        return
    assert stream.result is not None
    if list(stream.result.tokens) != null_tokens(prompt, max_new, VOCAB):
        tally.wrong += 1
        return
    tally.completed += 1
    tally.ok_times.append((start, time.monotonic()))


async def client_loop(endpoint: str, seed: int, tally: Tally, stop: asyncio.Event) -> None:
    rng = random.Random(seed)
    async with AsyncClient(endpoint, default_timeout_s=REQUEST_TIMEOUT_S) as client:
        while not stop.is_set():
            await one_request(client, rng, tally)


def waa_spec(runs: Path) -> LaunchSpec:
    return LaunchSpec(groups=(WorkerGroup("encoder", 2), WorkerGroup("decoder", 1),
                              WorkerGroup("decoder", 1, tp_size=2)),
                      runs_path=runs, transport="ipc", decode_cost_ms=5.0, encode_batch=8,
                      heartbeat_interval_s=0.25, heartbeat_timeout_s=5.0, drain_timeout_s=1.0)


def pipeline_spec(runs: Path) -> LaunchSpec:
    return LaunchSpec(groups=(WorkerGroup("pipeline", 1), WorkerGroup("pipeline", 1)),
                      runs_path=runs, transport="ipc", policy="rra", n_d=4,
                      decode_cost_ms=3.0, heartbeat_interval_s=0.25, heartbeat_timeout_s=5.0,
                      drain_timeout_s=1.0)


VICTIMS = {"waa": [("encoder", "encoder-enc0"), ("decoder", "decoder-dec0"),
                   ("tp_rank", "decoder-dec1.r1"), ("coordinator", "coordinator")],
           "rra": [("pipeline_stage", "pipeline-stage1"), ("coordinator", "coordinator")]}


def inflict(mesh: LocalMesh, role: str, victim: str, restart_after: float) -> None:
    """Blocking (run in a thread): kill ``victim`` and bring the role back."""
    if role == "coordinator":
        restart_coordinator(mesh, timeout_s=120.0)
        return
    group = group_of(mesh, victim)
    target = next(c for c in group if c.name == victim)
    kill(target)
    time.sleep(restart_after)
    if role == "tp_rank":  # the other ranks stop once the coordinator drops the group
        wait_exit(group, 15.0)
    restart_workers(mesh, group)


async def wait_all_ready(client: AsyncClient, mesh: LocalMesh, timeout_s: float) -> bool:
    """Every worker process of the mesh (replacements included: by pid) is READY."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            workers = (await client.stats(timeout_s=2.0)).stats["workers"]
            ready = {w["pid"] for w in workers if w["state"] == "ready"}
            if {c.pid for c in mesh.workers} <= ready:
                return True
        except ServerError:
            pass
        await asyncio.sleep(0.25)
    return False


async def soak(policy: str, seconds: float, every: float, clients: int,
               restart_after: float, runs: Path) -> dict[str, Any]:
    spec = waa_spec(runs) if policy == "waa" else pipeline_spec(runs)
    mesh = LocalMesh(spec, startup_timeout_s=120)
    mesh.start()
    tally, kills, stop = Tally(), [], asyncio.Event()
    CountingStream.duplicated = 0
    try:
        loops = [asyncio.create_task(client_loop(mesh.client_endpoint, i, tally, stop))
                 for i in range(clients)]
        t_end = time.monotonic() + seconds
        async with AsyncClient(mesh.client_endpoint) as probe:
            for n in range(10**6):
                await asyncio.sleep(every)
                if time.monotonic() > t_end - every / 2:
                    break
                role, victim = VICTIMS[policy][n % len(VICTIMS[policy])]
                kills.append(Kill(role, victim, time.monotonic()))
                print(f"[{policy}] kill {victim} ({role})", flush=True)
                try:
                    await asyncio.to_thread(inflict, mesh, role, victim, restart_after)
                except StartupError as exc:  # reported as never recovering, then stop
                    print(f"[{policy}] no recovery: {exc}", flush=True)
                    break
                ready = await wait_all_ready(probe, mesh, 60.0)
                kills[-1].ready_s = (time.monotonic() - kills[-1].t) if ready else None
                if not ready:
                    break
        stop.set()
        await asyncio.wait_for(asyncio.gather(*loops), REQUEST_TIMEOUT_S + 10)
    finally:
        mesh.stop()
    for k in kills:
        oks = [done for start, done in tally.ok_times if start > k.t and done > 0]
        k.first_ok_s = min(oks) - k.t if oks else None
        k.errors = sum(1 for start, done in tally.ok_times if done < 0 and k.t < -done < k.t + 15)
    return {"policy": policy, "seconds": seconds, "clients": clients, "sent": tally.sent,
            "completed": tally.completed, "errored": sum(tally.errored.values()),
            "errors_by_type": dict(tally.errored), "lost": tally.lost,
            "duplicated_tokens": CountingStream.duplicated, "wrong_tokens": tally.wrong,
            "kills": [asdict(k) | {"t": round(k.t, 3)} for k in kills]}


def table(reports: list[dict[str, Any]]) -> str:
    lines = ["| mesh | minutes | sent | completed | errored | lost | duplicated tokens | "
             "wrong outputs |", "|---|---|---|---|---|---|---|---|"]
    for r in reports:
        lines.append(f"| {r['policy']} | {r['seconds'] / 60:.1f} | {r['sent']} | "
                     f"{r['completed']} | {r['errored']} ({_fmt(r['errors_by_type'])}) | "
                     f"{r['lost']} | {r['duplicated_tokens']} | {r['wrong_tokens']} |")
    lines += ["", "| mesh | killed | role | first ok request after (s) | all READY after (s) | "
              "errors in the next 15 s |", "|---|---|---|---|---|---|"]
    for r in reports:
        for k in r["kills"]:
            lines.append(f"| {r['policy']} | {k['victim']} | {k['role']} | "
                         f"{_num(k['first_ok_s'])} | {_num(k['ready_s'])} | {k['errors']} |")
    return "\n".join(lines)


def _fmt(errors: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "-"


def _num(x: float | None) -> str:
    return "never" if x is None else f"{x:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mesh.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="total, split over meshes")
    parser.add_argument("--policy", choices=("both", "waa", "rra"), default="both")
    parser.add_argument("--every", type=float, default=25.0, help="seconds between kills")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--restart-after", type=float, default=1.0)
    parser.add_argument("--json", type=Path, help="write the reports here")
    args = parser.parse_args(argv)
    policies = ["waa", "rra"] if args.policy == "both" else [args.policy]
    seconds = args.minutes * 60 / len(policies)
    reports = []
    runs = Path(tempfile.mkdtemp(prefix="exegpt-soak-"))  # kept: the logs of every process
    print(f"logs: {runs}", flush=True)
    for policy in policies:
        reports.append(asyncio.run(soak(policy, seconds, args.every, args.clients,
                                        args.restart_after, runs)))
    print(table(reports))
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2))
    bad = sum(r["lost"] + r["duplicated_tokens"] + r["wrong_tokens"] for r in reports)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
