"""A SIGKILLed encoder on a planned WAA mesh: the coordinator re-plans for the workers that
remain (coordinator/replan_live.py), logs it, reports it in stats, and keeps serving."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from common.backend import null_tokens
from common.client import Client
from coordinator.launch import LaunchSpec, LocalMesh, WorkerGroup
from coordinator.planner.analytic import parse_profile_arg
from coordinator.planner.plan import Plan
from coordinator.planner.planning import make_plan
from coordinator.planner.workload import parse_workload
from coordinator.replan_live import live_replan_job, role_counts

VOCAB = 256
SMOL = "analytic:a40:smollm2-135m"
SHORT = "name=short;in=normal:64,32,128;out=normal:8,3,20"


def _plan_2e1d(path: Path) -> Plan:
    two = make_plan(parse_workload(SHORT), parse_profile_arg(SMOL), 2, 0.3, policy="waa-c")
    plan = Plan.from_json(live_replan_job(two.to_json(), SMOL, 2, 1, 0)["on_layout"])
    assert role_counts(plan) == (2, 1)
    path.write_text(plan.to_json())
    return plan


def _membership(client: Client, until: str, timeout_s: float = 40.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = client.stats(timeout_s=5.0).stats
        if stats["membership"][until] >= 1 or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def test_a_killed_encoder_gives_a_replan_for_the_survivors(tmp_path: Path) -> None:
    plan = _plan_2e1d(tmp_path / "plan.json")
    spec = LaunchSpec(groups=(WorkerGroup("encoder", 2), WorkerGroup("decoder", 1)),
                      runs_path=tmp_path / "runs", transport="ipc", model_shape="tiny-llama",
                      encode_batch=plan.B_E, decode_cost_ms=2.0, heartbeat_interval_s=0.2,
                      heartbeat_timeout_s=1.5, drain_timeout_s=2.0,
                      plan_file=str(tmp_path / "plan.json"),
                      coordinator_args=("--profile", SMOL))
    with LocalMesh(spec) as mesh, Client(mesh.client_endpoint, default_timeout_s=30) as client:
        assert list(client.generate(prompt_ids=[5], max_new_tokens=4).tokens) == null_tokens(
            [5], 4, VOCAB)
        enc0 = next(c for c in mesh.workers if c.name == "encoder-enc0")
        os.kill(enc0.pid, signal.SIGKILL)
        stats = _membership(client, "replan_after_loss")
        member = stats["membership"]
        assert member["replan_after_loss"] == 1, member
        event = member["recent"][-1]
        assert event["event"] == "replan_after_loss"
        assert (event["encoders"], event["decoders"]) == (1, 1)
        assert event["outcome"] in ("switched", "confirmed")
        assert event["old"]["B_E"] == plan.B_E and event["new"]["B_E"] >= 1
        assert event["predicted_new"]["throughput_seq_s"] > 0
        # the stats now compare with the plan for the live layout
        assert stats["plan_switches"][-1]["reason"] == "replan_after_loss"
        # nothing hangs: the survivors serve
        for i in range(4):
            out = client.generate(prompt_ids=[i + 1], max_new_tokens=8)
            assert list(out.tokens) == null_tokens([i + 1], 8, VOCAB)
    lines = [json.loads(line) for line in
             (spec.run_dir / "coordinator.jsonl").read_text().splitlines()]
    replans = [line for line in lines if line.get("event") == "replan_after_loss"]
    assert len(replans) == 1 and replans[0]["encoders"] == 1
