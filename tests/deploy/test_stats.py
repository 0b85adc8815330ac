"""`exegpt stats`: the numbers computed from lifecycles, and the command against a live mesh."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from common import protocol as P
from common.client import Client
from coordinator.commands._stats_view import (
    decode_batch_over_time,
    encode_batches,
    percentile,
    render_summary,
    request_metrics,
    summarize,
)

EXEGPT = [sys.executable, "-m", "coordinator.cli"]


def _life(arrival: float, enc: float, first: float, step: float, n: int) -> P.Lifecycle:
    tokens = tuple(first + i * step for i in range(n))
    return P.Lifecycle(t_arrival=arrival, t_queued=arrival, t_encode_start=enc,
                       t_encode_end=enc + 0.1, t_kv_sent=enc + 0.1, t_kv_received=enc + 0.12,
                       t_first_token=first, t_tokens=tokens, t_finish=tokens[-1])


def test_percentile_is_numpys_nearest_rank() -> None:
    rng = np.random.default_rng(0)
    for size in (1, 2, 7, 100, 1001):
        values = list(rng.exponential(size=size))
        for q in (50, 90, 99):
            assert percentile(values, q) == np.percentile(values, q, method="inverted_cdf")
    assert percentile([], 50) is None


def test_request_metrics_from_lifecycles() -> None:
    lives = [_life(0.0, 0.5, 1.0, 0.1, 11), _life(0.0, 0.5, 1.5, 0.2, 6),
             _life(1.0, 2.0, 3.0, 0.1, 3), P.Lifecycle(t_arrival=5.0)]  # last: unfinished
    m = request_metrics(lives, p99_output=6)
    assert m["finished"] == 3
    assert m["latency_s"]["p50"] == pytest.approx(2.2)  # latencies 2.0, 2.5, 2.2
    assert m["latency_s"]["p99"] == pytest.approx(2.5)
    assert m["ttft_s"]["mean"] == pytest.approx((1.0 + 1.5 + 2.0) / 3)
    assert m["tpot_s"]["p50"] == pytest.approx(0.1) and m["tpot_s"]["p99"] == pytest.approx(0.2)
    assert m["window_s"] == pytest.approx(3.2)  # first arrival 0.0 .. last finish 3.2
    assert m["throughput_tok_s"] == pytest.approx(20 / 3.2)
    assert m["latency_p99len_s"] == pytest.approx(2.5)  # the 11- and 6-token requests
    assert m["kv_transfer_s"]["p50"] == pytest.approx(0.02)


def test_batches_and_adjustments_from_encode_stamps() -> None:
    lives = [_life(0, 1.0, 2, 0.1, 2)] * 4 + [_life(0, 3.0, 4, 0.1, 2)] * 2 + \
        [_life(0, 5.0, 6, 0.1, 2)] * 2
    assert [b["size"] for b in encode_batches(lives)] == [4, 2, 2]
    stats = P.Stats(req_id="x", stats={"requests": {}, "workers": []},
                    requests={str(i): lf for i, lf in enumerate(lives)})
    summary = summarize(stats, {"B_E": 4, "workload_info": {"p99_output": 2}})
    assert summary["B_E_changes"] == [{"t": 3.0, "from": 4, "to": 2}]
    reported = P.Stats(req_id="x", stats={"adjustments": [{"from": 4, "to": 3}]})
    assert summarize(reported)["B_E_changes"] == [{"from": 4, "to": 3}]


def test_decode_batch_is_the_time_average_of_running_sequences() -> None:
    lives = [_life(0, 0, 0.0, 1.0, 11), _life(0, 0, 5.0, 1.0, 6)]  # [0,10] and [5,10]
    buckets = decode_batch_over_time(lives, buckets=2)
    assert [b["mean_batch"] for b in buckets] == pytest.approx([1.0, 2.0])


def test_render_says_na_without_lifecycles() -> None:
    stats = P.Stats(req_id="x", stats={"requests": {"completed": 0}, "workers": [
        {"worker_id": "dec0", "role": "decoder", "state": "ready", "load": {"steps": 3}}]})
    text = render_summary(summarize(stats))
    assert "no request lifecycles" in text and "dec0" in text and "n/a" in text


@pytest.fixture
def mesh(tmp_path: Path):  # noqa: ANN201
    from coordinator.launch import LaunchSpec, LocalMesh, WorkerGroup

    spec = LaunchSpec(groups=(WorkerGroup("encoder", 1), WorkerGroup("decoder", 1)),
                      runs_path=tmp_path, transport="tcp", model_shape="tiny-llama")
    with LocalMesh(spec) as running:
        yield running


def test_stats_command_against_a_live_mesh(mesh, tmp_path: Path) -> None:  # noqa: ANN001
    endpoint = mesh.client_endpoint
    with Client(endpoint, default_timeout_s=30) as client:
        for i in range(5):
            client.generate(prompt_ids=[1, 2, 3 + i], max_new_tokens=4)
    done = subprocess.run([*EXEGPT, "stats", "--endpoint", endpoint, "--json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["counters"]["completed"] == 5
    assert {w["role"] for w in summary["workers"]} == {"encoder", "decoder"}
    table = subprocess.run([*EXEGPT, "stats", "--endpoint", endpoint], capture_output=True,
                           text=True, timeout=60)
    assert table.returncode == 0 and "throughput" in table.stdout and "enc0" in table.stdout


def test_stats_without_a_server_fails_fast() -> None:
    started = time.monotonic()
    done = subprocess.run([*EXEGPT, "stats", "--endpoint", "tcp://127.0.0.1:9",
                           "--timeout", "1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "no answer from tcp://127.0.0.1:9" in done.stderr
    assert time.monotonic() - started < 20


def test_interval_rates_from_counter_snapshots() -> None:
    from coordinator.commands._stats_view import interval_rates

    rates = interval_rates({"completed": 10, "tokens_out": 500},
                           {"completed": 16, "tokens_out": 800}, 2.0)
    assert rates == {"seq_s": 3.0, "tok_s": 150.0, "interval_s": 2.0}
    assert interval_rates({}, {"completed": 1}, 1.0) is None
    summary = summarize(P.Stats(req_id="x", stats={"requests": {}}))
    summary["interval"] = rates
    assert "3" in render_summary(summary).split("throughput seq/s")[1].split("\n")[0]
