"""The three arms of `exegpt bench adapt`: one workload shift served three ways.

    adapt    the old plan's mesh with --adapt: the coordinator detects, re-plans, switches knobs
    keep     the old plan's mesh without --adapt: the old plan serves the new traffic
    restart  the old plan's mesh until the shift; then drain, stop, start a mesh running the
             plan made for the new law (oracle timing: the restart begins AT the shift, so
             its gap is the restart's own cost, not a detector's)

Each arm is a real null-model mesh (RRA on two stage workers, SmolLM2-135M shapes) whose
workers sleep the configured per-pass costs, planned from a profile that describes exactly
those costs (coordinator/commands/_null_profile.py), driven by a closed-loop client that keeps
``concurrency`` requests in flight: lengths from the old law until the shift, the new law
after. Every request is checked for the null model's tokens (no drop, no duplicate).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.commands._null_profile import NullCosts, null_profile_dict

ARMS = ("adapt", "keep", "restart")
SHAPE = "smollm2-135m"


@dataclass(frozen=True)
class BenchConfig:
    """One shift scenario; defaults are the run written into docs/adaptation.md."""

    costs: NullCosts = field(default_factory=lambda: NullCosts(25.0, 5.0, 1.5))
    old: str = "name=s-like;in=normal:64,32,128;out=normal:8,3,16"
    new: str = "name=t-like;in=normal:32,16,64;out=normal:32,16,80"
    bound_s: float = 8.0
    before_s: float = 40.0  # old-law traffic before the shift
    after_s: float = 100.0  # new-law traffic after it
    concurrency: int = 160  # requests the client keeps in flight
    adapt_options: str = ""  # --adapt-options (empty: the defaults)
    # the old plan's stages as served ("" = the planner's even split): a layout the re-plan
    # changes, so the adapt arm re-lays the stages out live (docs/adaptation.md)
    served_layers: str = "0:10,10:30"
    seed: int = 0
    bin_s: float = 2.0  # throughput-over-time resolution

    def __post_init__(self) -> None:
        if min(self.bound_s, self.before_s, self.after_s, self.bin_s) <= 0:
            raise ValueError("bound, phase lengths and bin must be > 0 s")
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.served_layers:
            served_ranges(self.served_layers)


def served_ranges(text: str) -> tuple[tuple[int, int], ...]:
    """``"0:10,10:30"`` -> ((0, 10), (10, 30)) (contiguity is checked against the model)."""
    try:
        out = tuple((int(a), int(b)) for a, b in (p.split(":") for p in text.split(",")))
    except ValueError as exc:
        raise ValueError(f"served layers {text!r}: use LO:HI,LO:HI,...") from exc
    if len(out) != 2:
        raise ValueError(f"served layers {text!r}: the bench runs two stage workers")
    return out


@dataclass
class ArmRun:
    """What one arm produced: per-request records and the times that matter."""

    arm: str
    records: list[dict[str, Any]] = field(default_factory=list)
    t0: float = 0.0
    t_shift: float = 0.0
    t_end: float = 0.0
    sent_before_shift: int = 0
    switches: list[dict[str, Any]] = field(default_factory=list)
    restart: dict[str, float] | None = None


def make_plans(cfg: BenchConfig, workdir: Path) -> tuple[Any, Any, str]:
    """The profile file of the null costs, the plan for the old law and for the new law."""
    from coordinator.planner.planning import make_plan
    from coordinator.planner.profile import Profile
    from coordinator.planner.workload import parse_workload

    workdir.mkdir(parents=True, exist_ok=True)
    profile_path = workdir / "null-profile.json"
    profile_path.write_text(json.dumps(null_profile_dict(cfg.costs, SHAPE)))
    profile = Profile.load(profile_path)
    old = make_plan(parse_workload(cfg.old), profile, 2, cfg.bound_s, policy="rra")
    new = make_plan(parse_workload(cfg.new), profile, 2, cfg.bound_s, policy="rra")
    if cfg.served_layers:
        import dataclasses

        from coordinator.pipeline_driver import _check_cover
        from coordinator.planner.plan import WorkerGroup

        ranges = served_ranges(cfg.served_layers)
        _check_cover(ranges, profile.model.num_layers, "served layers")
        old = dataclasses.replace(old, worker_groups=tuple(
            WorkerGroup("pipeline", 1, 1, r) for r in ranges))
    for plan, name in ((old, "old"), (new, "new")):
        (workdir / f"plan-{name}.json").write_text(plan.to_json())
    return old, new, str(profile_path)


def _spec(cfg: BenchConfig, plan_path: Path, runs: Path, adapt: str | None) -> Any:
    from coordinator.launch import LaunchSpec
    from coordinator.plan_launch import plan_fields
    from coordinator.planner.plan import Plan

    plan = Plan.from_json(plan_path.read_text())
    extra: tuple[str, ...] = ()
    if adapt is not None:
        extra = ("--profile", adapt, "--adapt")
        extra += ("--adapt-options", cfg.adapt_options) if cfg.adapt_options else ()
    c = cfg.costs
    return LaunchSpec(**plan_fields(plan, null_model=True, decoder_capacity=4096),
                      runs_path=runs, transport="ipc", model_shape=SHAPE,
                      encode_cost_ms=c.encode_ms, encode_cost_ms_per_token=c.encode_ms_per_token,
                      decode_cost_ms=c.decode_ms, heartbeat_interval_s=0.5,
                      plan_file=str(plan_path), coordinator_args=extra)


class Traffic:
    """Closed-loop requests: the old law before ``t_shift``, the new law after."""

    def __init__(self, cfg: BenchConfig, vocab: int) -> None:
        from coordinator.planner.workload import parse_workload

        self.cfg, self.vocab = cfg, vocab
        self.rng = np.random.default_rng(cfg.seed)
        self.laws = {"old": parse_workload(cfg.old), "new": parse_workload(cfg.new)}
        self.count = 0

    def next(self, law: str) -> tuple[str, list[int], int]:
        ins, outs = self.laws[law].sample(self.rng, 1)
        self.count += 1
        prompt = [int(t) for t in self.rng.integers(0, self.vocab, int(ins[0]))]
        return f"{law}{self.count}", prompt, int(outs[0])


async def _drive(client: Any, traffic: Traffic, run: ArmRun, until: float) -> None:
    """Keep ``concurrency`` requests in flight until ``until`` (the old law before the shift,
    the new one after: no pause between them); then wait for every answer."""
    from common.backend import null_tokens

    gate = asyncio.Semaphore(traffic.cfg.concurrency)
    tasks = []

    async def one(law: str, req_id: str, prompt: list[int], n: int) -> None:
        try:
            res = await client.generate(prompt_ids=prompt, max_new_tokens=n, req_id=req_id)
            if list(res.tokens) != null_tokens(prompt, n, traffic.vocab):
                raise AssertionError(f"{req_id}: wrong tokens")
            lc = res.lifecycle
            run.records.append({"id": req_id, "law": law, "in": len(prompt), "out": n,
                                "t_arrival": lc.t_arrival, "t_encode": lc.t_encode_start,
                                "t_finish": lc.t_finish, "t_done": time.time()})
        finally:
            gate.release()

    while time.time() < until:
        await gate.acquire()
        now = time.time()
        if now >= until:
            gate.release()
            break
        law = "old" if now < run.t_shift else "new"
        run.sent_before_shift += law == "old"
        tasks.append(asyncio.create_task(one(law, *traffic.next(law))))
    await asyncio.gather(*tasks)


async def _switches(client: Any) -> list[dict[str, Any]]:
    adapt = (await client.stats()).stats.get("adapt")
    return list(adapt["switches"]) if adapt else []


async def _wait_planner(client: Any, timeout_s: float = 120.0) -> None:
    """The adapter's planner process warms up (spawn + imports) before the traffic starts."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        adapt = (await client.stats()).stats.get("adapt")
        if adapt is None or adapt["planner_warm_s"] is not None:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError("the adapter's planner process did not start")


def run_arm(arm: str, cfg: BenchConfig, workdir: Path, profile: str) -> ArmRun:
    """One arm, start to finish (meshes started and stopped here)."""
    from common.models.config import ModelConfig
    from coordinator.launch import LocalMesh

    runs = workdir / "runs"
    run = ArmRun(arm)
    traffic = Traffic(cfg, ModelConfig.preset(SHAPE).vocab_size)
    old_path, new_path = workdir / "plan-old.json", workdir / "plan-new.json"
    mesh = LocalMesh(_spec(cfg, old_path, runs, profile if arm == "adapt" else None), 120)
    mesh.start()
    try:
        asyncio.run(_phases(arm, cfg, mesh, traffic, run, new_path, runs))
    finally:
        mesh.stop()
    return run


async def _phases(arm: str, cfg: BenchConfig, mesh: Any, traffic: Traffic, run: ArmRun,
                  new_path: Path, runs: Path) -> None:
    from common.client import AsyncClient
    from coordinator.launch import LocalMesh

    async with AsyncClient(mesh.client_endpoint, default_timeout_s=600) as client:
        await _wait_planner(client)
        run.t0 = time.time()
        run.t_shift = run.t0 + cfg.before_s
        end = run.t_shift + cfg.after_s
        await _drive(client, traffic, run, run.t_shift if arm == "restart" else end)
        if arm != "restart":
            run.switches = await _switches(client)
            run.t_end = time.time()
            return
    t_drained = time.time()
    await asyncio.to_thread(mesh.stop)
    fresh = LocalMesh(_spec(cfg, new_path, runs, None), 120)
    await asyncio.to_thread(fresh.start)
    try:
        t_up = time.time()
        run.restart = {"drain_s": t_drained - run.t_shift, "stop_start_s": t_up - t_drained,
                       "gap_s": t_up - run.t_shift}
        async with AsyncClient(fresh.client_endpoint, default_timeout_s=600) as client:
            await _drive(client, traffic, run, run.t_shift + cfg.after_s)
        run.t_end = time.time()
    finally:
        await asyncio.to_thread(fresh.stop)


def knobs_of(plan: Any) -> dict[str, Any]:
    """A plan's knobs and promises, for the report."""
    p = plan.predicted
    return {"B_E": plan.B_E, "N_D": plan.N_D, "streams": plan.microbatches,
            "stages": [list(g.layer_range) for g in plan.worker_groups],
            "throughput_seq_s": round(p["throughput_seq_s"], 2),
            "latency_p99len_s": round(p["latency_p99len_s"], 2)}


def predict(plan: Any, spec: str, profile_path: str) -> dict[str, float]:
    """What the planner predicts for ``plan``'s knobs serving the law ``spec`` (e.g. the old
    plan on the new traffic: the "keep" arm's promise)."""
    from coordinator.planner.candidate import Candidate, WorkloadStats
    from coordinator.planner.costs import Costs
    from coordinator.planner.profile import Profile
    from coordinator.planner.simulator import simulate
    from coordinator.planner.workload import parse_workload

    cand = Candidate(plan.policy, plan.num_workers, plan.search.get("tp", 1),
                     plan.search.get("num_tp_workers", 0), plan.B_E, plan.N_D or 1,
                     plan.B_m or 1)
    m = simulate(cand, WorkloadStats(parse_workload(spec)), Costs(Profile.load(profile_path)))
    return {"throughput_seq_s": round(m.throughput_seq_s, 2),
            "latency_p99len_s": round(m.latency(plan.sla), 2)}
