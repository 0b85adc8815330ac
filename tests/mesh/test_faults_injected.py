"""Fault injection through real processes (null model): one TP rank SIGKILLed, KV handoffs
dropped and delayed (EXEGPT_FAULTS), a pipeline stage stalled past its heartbeat deadline.

Every check reads the raw wire (tests/mesh/test_worker_loss.py ``run_requests``): each request
gets exactly one answer, a Result whose tokens equal the undisturbed run (the null model's
output is a function of prompt and position) with a gap-free, repeat-free stream, or one clear
Error; nothing hangs, and nothing is left running on a worker afterwards (KV freed).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from common.backend import null_tokens
from common.client import Client
from common.faults import Faults
from coordinator.launch import LaunchSpec, LocalMesh, WorkerGroup
from tests.mesh.meshctl import wait_exit
from tests.mesh.test_worker_loss import Seen, run_requests

VOCAB = 256
FAST = {"heartbeat_interval_s": 0.25, "heartbeat_timeout_s": 5.0, "drain_timeout_s": 1.0}


def check_answers(seen: dict[str, Seen], prompts: dict[str, tuple[int, ...]], max_new: int,
                  error_codes: tuple[str, ...]) -> dict[str, int]:
    """Exactly one answer per request; a Result streams the undisturbed tokens in order, an
    Error (one of ``error_codes``) ends a clean prefix of them. Returns counts by outcome."""
    counts = {"ok": 0, "error": 0}
    for req_id, prompt in prompts.items():
        entry, expected = seen[req_id], null_tokens(prompt, max_new, VOCAB)
        assert len(entry.results) + len(entry.errors) == 1, (req_id, entry)
        position = 0
        for index, tokens in entry.chunks:
            assert index == position, f"{req_id}: chunk at {index}, expected {position}"
            position += len(tokens)
        streamed = [t for _, tokens in entry.chunks for t in tokens]
        assert streamed == expected[:len(streamed)], f"{req_id}: wrong or duplicated tokens"
        if entry.results:
            assert streamed == expected and list(entry.results[0].tokens) == expected
            counts["ok"] += 1
        else:
            assert entry.errors[0].code in error_codes, entry.errors[0]
            counts["error"] += 1
    return counts


def _epoch(event: dict) -> float:
    """A log line's wall-clock time (JSON logs carry an ISO-8601 UTC ``timestamp``)."""
    from datetime import datetime

    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


def idle_workers(endpoint: str, timeout_s: float = 5.0) -> list[dict]:
    """Worker loads once nothing runs any more (polls: heartbeats carry ``active``)."""
    deadline = time.monotonic() + timeout_s
    with Client(endpoint, default_timeout_s=10) as client:
        while True:
            workers = client.stats().stats["workers"]
            if all(w["load"].get("active", 0) == 0 for w in workers) or \
                    time.monotonic() > deadline:
                return workers
            time.sleep(0.2)


def test_one_tp_rank_killed_takes_its_group_down_and_requests_rerun(tmp_path: Path) -> None:
    spec = LaunchSpec(groups=(WorkerGroup("encoder", 1), WorkerGroup("decoder", 2, tp_size=2)),
                      runs_path=tmp_path, transport="ipc", decode_cost_ms=10.0,
                      **FAST)  # type: ignore[arg-type]
    prompts = {f"t{i}": (i, 5, i + 1) for i in range(16)}
    with LocalMesh(spec) as mesh:
        rank1 = next(c for c in mesh.workers if c.name == "decoder-dec0.r1")
        rank0 = next(c for c in mesh.workers if c.name == "decoder-dec0.r0")
        t0, killed = time.monotonic(), []
        # 10 ms per step: 1000 tokens outlast the 5 s deadline (null-model ranks decode on
        # their own, so rank 0 keeps streaming until its group is declared lost)
        seen = run_requests(mesh.client_endpoint, prompts, 1000,
                            lambda: (killed.append(time.time()),
                                     os.kill(rank1.pid, signal.SIGKILL)), timeout_s=45)
        seen.pop("__killed_at__")
        assert time.monotonic() - t0 < 40
        counts = check_answers(seen, prompts, 1000, ())
        assert counts == {"ok": len(prompts), "error": 0}
        assert wait_exit([rank0], 10) == [1]  # its group is gone: rank 0 was told so
        log = (mesh.spec.run_dir / "coordinator.jsonl").read_text()
        assert '"request_rerun"' in log and "dec0.r1" in log
        # the coordinator watches local worker processes (pidfds): lost at the kill, not at
        # the 5 s heartbeat deadline
        lost = [json.loads(line) for line in log.splitlines() if '"worker_lost"' in line]
        r1 = next(e for e in lost if e["worker"] == "dec0.r1")
        assert r1["why"].startswith("process ") and r1["why"].endswith(" exited"), r1
        assert _epoch(r1) - killed[0] < FAST["heartbeat_timeout_s"] / 2, (r1, killed)
        workers = idle_workers(mesh.client_endpoint)
        assert sorted(w["worker_id"] for w in workers) == ["dec1.r0", "dec1.r1", "enc0"]


def test_faults_env_is_parsed_strictly() -> None:
    assert not Faults.parse("").active
    faults = Faults.parse("kv_drop=0.25, kv_delay=0.5,kv_delay_ms=900,seed=3")
    assert (faults.kv_drop, faults.kv_delay, faults.kv_delay_ms, faults.seed) == (
        0.25, 0.5, 900.0, 3)
    for bad in ("kv_drop=2", "kv_dorp=0.1", "kv_delay=0.1", "kv_drop=x", "kv_drop=0.6,"
                "kv_delay=0.6,kv_delay_ms=1"):
        with pytest.raises(ValueError, match="EXEGPT_FAULTS"):
            Faults.parse(bad)


def test_dropped_and_delayed_kv_times_out_and_reruns(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A quarter of the handoffs vanish, a quarter arrive 1.5 s late (past the 0.8 s KV
    timeout): those requests are re-run under a new wire id (a late handoff then names a dead
    run and its decoder is told to drop it); after 3 re-runs a request errors instead."""
    monkeypatch.setenv("EXEGPT_FAULTS", "kv_drop=0.25,kv_delay=0.25,kv_delay_ms=1500,seed=3")
    spec = LaunchSpec(groups=(WorkerGroup("encoder", 1), WorkerGroup("decoder", 2)),
                      runs_path=tmp_path, transport="ipc", decode_cost_ms=5.0, encode_batch=4,
                      coordinator_args=("--kv-timeout", "0.8"), **FAST)  # type: ignore[arg-type]
    prompts = {f"k{i}": (i + 3, i) for i in range(24)}
    with LocalMesh(spec) as mesh:
        t0 = time.monotonic()
        seen = run_requests(mesh.client_endpoint, prompts, 40, lambda: None, timeout_s=40)
        seen.pop("__killed_at__")
        assert time.monotonic() - t0 < 35
        counts = check_answers(seen, prompts, 40, ("worker_lost",))
        assert counts["ok"] >= len(prompts) // 2, counts
        time.sleep(2.0)  # the last delayed handoffs land, are refused and freed
        workers = idle_workers(mesh.client_endpoint)
        assert all(w["load"].get("active", 0) == 0 for w in workers), workers
        with Client(mesh.client_endpoint) as client:
            requests = client.stats().stats["requests"]
        assert requests["rerun"] >= 1 and requests["in_flight"] == 0
        encoder_log = (mesh.spec.run_dir / "encoder-enc0.jsonl").read_text()
        assert '"kv_drop"' in encoder_log and '"kv_delay"' in encoder_log


def test_a_stalled_pipeline_stage_fails_its_requests_then_rejoins_fresh(
        tmp_path: Path) -> None:
    spec = LaunchSpec(groups=(WorkerGroup("pipeline", 1), WorkerGroup("pipeline", 1)),
                      runs_path=tmp_path, transport="ipc", policy="rra", n_d=4,
                      decode_cost_ms=5.0, **FAST)  # type: ignore[arg-type]
    prompts = {f"p{i}": (i + 1, 9) for i in range(8)}
    with LocalMesh(spec) as mesh:
        stage1 = next(c for c in mesh.workers if c.name == "pipeline-stage1")
        t0 = time.monotonic()
        try:
            seen = run_requests(mesh.client_endpoint, prompts, 400,
                                lambda: os.kill(stage1.pid, signal.SIGSTOP), timeout_s=30)
        finally:
            os.kill(stage1.pid, signal.SIGCONT)
        seen.pop("__killed_at__")
        assert time.monotonic() - t0 < 20  # the heartbeat deadline, not the request timeout
        counts = check_answers(seen, prompts, 400, ("worker_lost",))
        assert counts == {"ok": 0, "error": len(prompts)}
        assert all("stage1" in seen[r].errors[0].message for r in prompts)
        # SIGCONT: the stage hears it was declared lost (or notices the silence), drops what
        # it held and registers again as a fresh stage: the pipeline serves again
        with Client(mesh.client_endpoint, default_timeout_s=30) as client:
            deadline = time.monotonic() + 20
            while True:  # "unavailable" until the stage is READY again
                try:
                    out = client.generate(prompt_ids=[3, 4], max_new_tokens=12)
                    break
                except Exception:  # noqa: BLE001 - Unavailable while it registers
                    assert time.monotonic() < deadline
                    time.sleep(0.3)
        assert list(out.tokens) == null_tokens([3, 4], 12, VOCAB)
        assert stage1.poll() is None
        workers = idle_workers(mesh.client_endpoint)  # the surviving stage 0 freed them too
        assert all(w["load"].get("active", 0) == 0 for w in workers), workers
        stage_log = (mesh.spec.run_dir / "pipeline-stage1.jsonl").read_text()
        assert '"rejoined"' in stage_log and '"dropping_all"' in stage_log
