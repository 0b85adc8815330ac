"""`exegpt stats` against a live null-model mesh served from a plan: what the coordinator
measured (coordinator/metrics.py), through the SDK and the command."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common import protocol as P
from common.backend import NullShape
from common.client import Client
from common.models.config import ModelConfig
from coordinator.commands._stats_view import render_text, summarize
from coordinator.launch import LocalMesh

EXEGPT = [sys.executable, "-m", "coordinator.cli"]
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9] * 12, [3, 1], [2] * 7, [5] * 20]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalMesh, Any]]:
    """`exegpt serve --null-model --plan` (in process): one encoder, two decoders."""
    from coordinator.commands import serve
    from tests.deploy.conftest import make_plan

    tmp = tmp_path_factory.mktemp("stats")
    plan = make_plan("waa", 3, "tiny-llama")
    path = tmp / "plan.json"
    path.write_text(plan.to_json())  # type: ignore[attr-defined]
    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--null-model", "--model-shape", "tiny-llama",
                              "--plan", str(path), "--runs-dir", str(tmp / "runs")])
    spec = serve.spec_from_args(args)
    assert spec.plan_file == str(path.resolve())
    with LocalMesh(spec) as mesh:
        yield mesh, plan


def _wait_for_kv(client: Client, expected: int, timeout_s: float = 20.0) -> P.Stats:
    """Heartbeats carry the workers' KV counters: wait until both sides reported all of it."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = client.stats(include_requests=True)
        kv = stats.stats["overall"]["kv_bytes"]
        if kv["sent"] == expected and kv["received"] == expected or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def test_stats_of_a_live_mesh_against_its_plan(served: tuple[LocalMesh, Any]) -> None:
    mesh, plan = served
    shape = NullShape(ModelConfig.preset("tiny-llama"))
    expected_kv = sum(shape.kv_bytes(len(p)) for p in PROMPTS)
    with Client(mesh.client_endpoint, default_timeout_s=30) as client:
        ids = [client.generate(prompt_ids=p, max_new_tokens=NEW_TOKENS).req_id for p in PROMPTS]
        stats = _wait_for_kv(client, expected_kv)
        bare = client.stats()
    tree = stats.stats
    assert tree["overall"]["kv_bytes"] == {"sent": expected_kv, "received": expected_kv}
    workers = tree["per_worker"]
    assert {w: workers[w]["role"] for w in ("enc0", "dec0", "dec1")} == {
        "enc0": "encoder", "dec0": "decoder", "dec1": "decoder"}
    assert workers["enc0"]["kv_bytes_sent"] == expected_kv
    received = [workers[d]["kv_bytes_received"] for d in ("dec0", "dec1")]
    assert sum(n or 0 for n in received) == expected_kv  # None: no heartbeat from it yet
    assert workers["enc0"]["encoded"] == len(PROMPTS) == workers["enc0"]["encode_batches"][
        "requests"]
    assert workers["dec0"]["decoded"] + workers["dec1"]["decoded"] == len(PROMPTS)
    overall = tree["overall"]
    assert overall["finished"] == len(PROMPTS) and overall["latency_s"]["p99"] > 0
    assert overall["p99_length"] == {**overall["p99_length"], "output_len": NEW_TOKENS,
                                     "count": len(PROMPTS)}
    assert overall["throughput"]["tok_s"] > 0 and overall["ttft_s"]["count"] == len(PROMPTS)
    assert overall["encode_batches"]["count"] >= 1
    assert overall["decode_batch"]["per_step_mean"] >= 1  # the decoders count their steps
    # lifecycles: every stamp of every request, one per output token
    assert set(stats.requests) == set(ids) == set(tree["request_info"])
    for life in stats.requests.values():
        assert len(life.t_tokens) == NEW_TOKENS
        assert life.t_arrival <= life.t_encode_start <= life.t_kv_sent <= life.t_kv_received \
            <= life.t_first_token <= life.t_finish
    assert bare.requests == {} and "request_info" not in bare.stats
    # the plan's predictions beside the measured numbers
    assert tree["plan"]["policy"] == plan.policy
    rows = {r["metric"]: r for r in tree["vs_plan"]["rows"]}
    predicted = plan.predicted["throughput_seq_s"]
    assert rows["throughput_seq_s"]["predicted"] == pytest.approx(predicted)
    assert rows["throughput_seq_s"]["ratio"] == pytest.approx(
        overall["throughput"]["seq_s"] / predicted)
    assert tree["vs_plan"]["latency_bound"]["met"] is True  # the test plan's bound is 1e18 s
    text = render_text(summarize(stats))
    for needle in ("per worker", "measured vs plan", "recent requests", "dec1", "KV bytes",
                   "worker compute", "CPU stretch"):
        assert needle in text


def test_stats_command(served: tuple[LocalMesh, Any]) -> None:
    endpoint = served[0].client_endpoint
    with Client(endpoint, default_timeout_s=30) as client:
        client.generate(prompt_ids=[1, 2, 3], max_new_tokens=4)
    done = subprocess.run([*EXEGPT, "stats", "--connect", endpoint, "--json", "--requests"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["requests"]["completed"] >= 1 and summary["lifecycles"]
    life = next(iter(summary["lifecycles"].values()))
    assert life["t_finish"] >= life["t_arrival"] and life["t_tokens"]
    table = subprocess.run([*EXEGPT, "stats", "--endpoint", endpoint], capture_output=True,
                           text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    assert "throughput" in table.stdout and "enc0" in table.stdout
    assert "measured vs plan" in table.stdout


def test_stats_without_a_server_fails_fast() -> None:
    started = time.monotonic()
    done = subprocess.run([*EXEGPT, "stats", "--endpoint", "tcp://127.0.0.1:9",
                           "--timeout", "1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "no answer from tcp://127.0.0.1:9" in done.stderr
    assert time.monotonic() - started < 20


def test_stats_rejects_a_bad_plan(tmp_path: Path) -> None:
    bad = tmp_path / "plan.json"
    bad.write_text("{}")
    done = subprocess.run([*EXEGPT, "stats", "--plan", str(bad)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "not a plan JSON" in done.stderr


def test_a_plan_given_to_the_command_is_compared_too() -> None:
    """``--plan`` on the command side puts that plan beside a coordinator's measurements."""
    from coordinator.metrics import Metrics
    from tests.runner.test_metrics import done, plan_dict

    m = Metrics()
    m.on_finish(done("a", 0.0, 0.5, 1.0, 0.1, 5))
    msg = P.Stats(req_id="x", stats={"requests": {"completed": 1}, **m.snapshot()})
    summary = summarize(msg, plan_dict(throughput_seq_s=1.0))
    assert summary["vs_plan"]["rows"][0]["ratio"] == pytest.approx(1 / 1.4)
    assert "measured vs plan" in render_text(summary)
    old = summarize(P.Stats(req_id="x", stats={"requests": {"completed": 0}}))
    assert "reports no measurements" in render_text(old)
