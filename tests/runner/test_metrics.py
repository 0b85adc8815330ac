"""coordinator.metrics: the numbers `exegpt stats` reports, from hand-made request lifecycles."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from common import protocol as P
from coordinator.metrics import Limits, Metrics, load_plan
from coordinator.metrics_report import percentile, step_sum
from coordinator.requests import Request

SAMPLING = P.Sampling()


def done(req_id: str, arrival: float, enc: float, first: float, step: float, n: int,
         decoder: str = "dec0", encoder: str = "enc0", prompt_len: int = 4) -> Request:
    """A finished request: encode at ``enc`` (0.1 s), KV 0.01 s later, ``n`` tokens from
    ``first`` every ``step`` seconds."""
    r = Request(req_id=req_id, client=b"c", prompt=tuple(range(prompt_len)), max_new_tokens=n,
                sampling=SAMPLING, stream=False, deadline=None, encoder=encoder, decoder=decoder)
    t = r.times
    t.t_arrival = t.t_queued = arrival
    t.t_encode_start, t.t_encode_end, t.t_kv_sent = enc, enc + 0.1, enc + 0.1
    t.t_kv_received = enc + 0.11
    r.tokens = [7] * n
    t.t_tokens = [first + i * step for i in range(n)]
    t.t_first_token, t.t_finish = first, t.t_tokens[-1]
    return r


def plan_dict(**predicted: float) -> dict:
    return {"policy": "waa-c", "B_E": 4, "B_D": 8.0, "N_D": None, "B_m": None,
            "latency_bound_s": 3.0, "sla": "b", "workload": "w", "num_workers": 2,
            "predicted": predicted, "workload_info": {"p99_output": 10}}


def test_percentiles_are_numpys_nearest_rank() -> None:
    rng = np.random.default_rng(0)
    for size in (1, 2, 7, 100, 1001):
        values = list(rng.exponential(size=size))
        for q in (50, 90, 99):
            assert percentile(values, q) == np.percentile(values, q, method="inverted_cdf")
    assert percentile([], 50) is None


def test_latency_ttft_tpot_and_throughput() -> None:
    m = Metrics()
    m.on_finish(done("a", 0.0, 0.5, 1.0, 0.1, 11))  # latency 2.0, from encode 1.5
    m.on_finish(done("b", 0.0, 0.5, 1.5, 0.2, 6))  # latency 2.5
    m.on_finish(done("c", 1.0, 2.0, 3.0, 0.1, 3))  # latency 2.2
    o = m.snapshot()["overall"]
    assert o["latency_s"]["p50"] == pytest.approx(2.2)
    assert o["latency_s"]["p99"] == pytest.approx(2.5)
    assert o["latency_encode_s"]["max"] == pytest.approx(2.5 - 0.5)
    assert o["queueing_s"]["mean"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert o["ttft_s"]["mean"] == pytest.approx((1.0 + 1.5 + 2.0) / 3)
    assert o["ttft_encode_s"]["p50"] == pytest.approx(1.0)
    assert o["tpot_s"]["p50"] == pytest.approx(0.1) and o["tpot_s"]["max"] == pytest.approx(0.2)
    assert o["kv_transfer_s"]["p50"] == pytest.approx(0.01)
    assert o["throughput"]["span_s"] == pytest.approx(3.2)  # first arrival .. last finish
    assert o["throughput"]["tok_s"] == pytest.approx(20 / 3.2)
    assert o["throughput_since_start"]["seq_s"] == pytest.approx(3 / 3.2)


def test_p99_length_latency_is_the_time_to_the_p99th_token() -> None:
    m = Metrics()
    for n in range(1, 101):  # output lengths 1..100: the p99 length is 99
        m.on_finish(done(f"r{n}", 0.0, 1.0, 2.0, 0.01 * n, n))
    p99 = m.snapshot()["overall"]["p99_length"]
    assert p99["output_len"] == 99 and p99["count"] == 2
    at_99 = [2.0 + 98 * 0.01 * n - 1.0 for n in (99, 100)]  # token 99 of each, from encode
    assert p99["latency_s"] == pytest.approx(sum(at_99) / 2)
    assert p99["max_s"] == pytest.approx(max(at_99))
    assert p99["e2e_max_s"] == pytest.approx(max(at_99) + 1.0)


def test_memory_is_bounded_by_requests_and_token_stamps() -> None:
    m = Metrics(limits=Limits(window_requests=50, window_token_stamps=10_000, series_points=8,
                              recent=4, report_requests=10, report_token_stamps=25))
    for i in range(200):
        m.on_finish(done(f"r{i}", i, i + 0.1, i + 0.5, 0.01, 10))
        m.on_encode_batch("enc0", 3, 30, adjusted=True, reason="token sum over 20", now=i)
        m.on_worker_load("dec0", {"active": i % 5, "kv_bytes_received": i}, now=i)
    s = m.snapshot(include_requests=True)
    assert s["window"]["requests"] == 50 and s["window"]["token_stamps"] == 500
    assert s["overall"]["finished"] == 50 and m.totals["completed"] == 200
    assert m.totals["tokens_out"] == 2000
    assert len(s["per_worker"]["dec0"]["decode_batch"]["series"]) == 8
    assert len(s["overall"]["be_adjustments"]["recent"]) == 4
    assert s["overall"]["be_adjustments"]["count"] == 200
    lives = m.lifecycles()  # 25 token stamps fit two requests of 10
    assert list(lives) == ["r198", "r199"] == list(s["request_info"])
    tight = Metrics(limits=Limits(window_token_stamps=35))
    for i in range(10):
        tight.on_finish(done(f"r{i}", i, i + 0.1, i + 0.5, 0.01, 10))
    assert tight.snapshot()["window"] == {"requests": 3, "max_requests": 10_000,
                                          "token_stamps": 30, "max_token_stamps": 35}


def test_per_worker_split_kv_bytes_and_batches() -> None:
    m = Metrics()
    m.on_finish(done("a", 0.0, 0.5, 1.0, 0.1, 4, decoder="dec0"))
    m.on_finish(done("b", 0.0, 0.5, 1.0, 0.1, 4, decoder="dec1"))
    m.on_finish(done("c", 0.0, 0.5, 1.0, 0.1, 4, decoder="dec1"))
    m.on_encode_batch("enc0", 2, 8, adjusted=False, reason="plan", now=0.5)
    m.on_encode_batch("enc0", 1, 4, adjusted=True, reason="decode batch 9 > 8.0", now=0.6)
    m.on_worker_load("enc0", {"kv_bytes_sent": 300, "batches_done": 2}, now=1.0)
    m.on_worker_load("dec0", {"active": 1, "kv_bytes_received": 100}, now=1.0)
    m.on_worker_load("dec1", {"active": 2, "kv_bytes_received": 200}, now=1.2)
    m.on_worker_load("dec0", {"active": 0, "kv_bytes_received": 100}, now=1.4)
    s = m.snapshot(workers=[{"worker_id": "dec0", "role": "decoder", "state": "ready"}])
    w = s["per_worker"]
    assert (w["dec0"]["decoded"], w["dec1"]["decoded"], w["enc0"]["encoded"]) == (1, 2, 3)
    assert w["dec0"]["role"] == "decoder" and w["dec1"]["state"] == "gone"
    assert w["enc0"]["encode_batches"] == {"count": 2, "requests": 3, "tokens": 12, "mean": 1.5}
    assert w["enc0"]["encode_s"]["p50"] == pytest.approx(0.1)
    assert s["overall"]["kv_bytes"] == {"sent": 300, "received": 300}
    assert s["overall"]["encode_batches"]["mean"] == 1.5
    assert s["overall"]["be_adjustments"]["recent"][0]["reason"] == "decode batch 9 > 8.0"
    dec = s["overall"]["decode_batch"]  # summed over decoders: 1, 1+2, 0+2
    assert [p[1] for p in dec["series"]] == [1, 3, 2] and dec["mean"] == pytest.approx(2.0)
    assert dec["per_step_mean"] is None  # these heartbeats count no steps


def test_decode_batch_per_step_from_the_decoders_step_counters() -> None:
    m = Metrics(plan=plan_dict())
    for now, steps, seqs in ((1.0, 10, 30), (2.0, 20, 80), (3.0, 20, 80)):
        m.on_worker_load("dec0", {"active": 3, "steps": steps, "seq_steps": seqs}, now=now)
    m.on_worker_load("dec1", {"active": 2, "steps": 5, "seq_steps": 10}, now=1.5)
    s = m.snapshot()
    dec0 = s["per_worker"]["dec0"]["decode_batch"]
    assert dec0["per_step_series"] == [[1.0, 3.0], [2.0, 5.0]]  # no step between 2.0 and 3.0
    assert dec0["per_step_mean"] == pytest.approx(80 / 20)
    assert s["overall"]["decode_batch"]["per_step_mean"] == pytest.approx(90 / 25)
    rows = {r["metric"]: r for r in s["vs_plan"]["rows"]}
    assert rows["B_D"]["measured"] == pytest.approx(90 / 25)  # not the sampled running batch


def test_pipeline_passes() -> None:
    m = Metrics()
    m.on_pass(0, "encode", 4, (0.1, 0.2), now=1.0)
    m.on_pass(0, "decode", 4, (0.01, 0.02), now=1.1)
    m.on_pass(1, "decode", 3, (0.01, 0.02), now=1.2)
    s = m.snapshot()
    assert s["per_worker"]["stream0"]["passes"] == {"encode": 1, "decode": 1}
    assert s["overall"]["encode_batches"]["mean"] == 4
    assert s["overall"]["stage_busy_s"] == pytest.approx([0.12, 0.24])
    assert [p[1] for p in s["overall"]["decode_batch"]["series"]] == [4, 7]
    assert s["overall"]["decode_batch"]["per_step_mean"] == pytest.approx(3.5)


def test_measured_beside_the_plan() -> None:
    m = Metrics(plan=plan_dict(throughput_seq_s=2.0, throughput_tok_s=10.0,
                               latency_p99len_s=1.0, latency_p99_s=math.nan, ttft_s=0.25,
                               tpot_s=0.05))
    for i in range(4):  # 4 requests of 11 tokens, encode at i, first token i+0.5, step 0.1
        m.on_finish(done(f"r{i}", float(i), float(i), i + 0.5, 0.1, 11))
    m.on_worker_load("dec0", {"active": 4}, now=1.0)
    s = m.snapshot()
    rows = {r["metric"]: r for r in s["vs_plan"]["rows"]}
    assert rows["throughput_seq_s"]["measured"] == pytest.approx(4 / 4.5)
    assert rows["throughput_seq_s"]["ratio"] == pytest.approx(4 / 4.5 / 2.0)
    assert rows["latency_p99len_s"]["measured"] == pytest.approx(1.5)
    assert rows["latency_p99len_s"]["ratio"] == pytest.approx(1.5)
    assert rows["ttft_s"]["ratio"] == pytest.approx(2.0)
    assert rows["tpot_s"]["ratio"] == pytest.approx(2.0)
    assert rows["latency_p99_s"]["predicted"] is None and rows["latency_p99_s"]["ratio"] is None
    assert rows["B_D"]["ratio"] == pytest.approx(0.5) and rows["B_E"]["measured"] is None
    assert s["vs_plan"]["latency_bound"] == {"bound_s": 3.0, "sla": "b", "measured_s": 1.5,
                                             "met": True}
    slow = Metrics(plan={**plan_dict(), "latency_bound_s": 1.0, "sla": "a"})
    slow.on_finish(done("x", 0.0, 0.0, 0.5, 0.1, 11))
    assert slow.snapshot()["vs_plan"]["latency_bound"]["met"] is False
    assert Metrics().snapshot()["vs_plan"] is None


def test_snapshot_and_lifecycles_cross_the_wire() -> None:
    m = Metrics(plan=plan_dict(throughput_seq_s=1.0, latency_p99_s=math.nan))
    m.on_finish(done("a", 0.0, 0.5, 1.0, 0.1, 3))
    m.on_fail(done("b", 0.0, 0.5, 1.0, 0.1, 1), "timeout")
    m.on_worker_load("dec0", {"active": 1, "kv_bytes_received": 10}, now=1.0)
    msg = P.Stats(req_id="s", stats=m.snapshot(include_requests=True), requests=m.lifecycles())
    back = P.decode(P.encode(msg))
    assert back.stats["overall"]["failed"] == {"timeout": 1}
    assert back.requests["a"].t_tokens == pytest.approx((1.0, 1.1, 1.2))
    assert back.requests["a"].t_kv_received == pytest.approx(0.61)
    json.dumps(back.stats, allow_nan=False)  # --json prints standard JSON


def test_step_sum_carries_each_workers_latest_value() -> None:
    series = {"a": [(0.0, 2), (2.0, 0)], "b": [(1.0, 5)]}
    assert step_sum(series, limit=10) == [(0.0, 2), (1.0, 7), (2.0, 5)]
    assert step_sum(series, limit=1) == [(2.0, 5)]


def test_bad_plans_and_settings_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read plan"):
        load_plan(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"policy": "waa-c"}')
    with pytest.raises(ValueError, match="not a plan JSON"):
        load_plan(bad)
    bad.write_text("{")
    with pytest.raises(ValueError, match="not a plan JSON"):
        load_plan(bad)
    with pytest.raises(ValueError, match="window_requests"):
        Limits(window_requests=0)
