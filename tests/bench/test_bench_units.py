"""The bench's arithmetic on synthetic runs: bounds, measures, the request draw, the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from coordinator.bench import bounds as B
from coordinator.bench.config import BenchConfig, parse_bounds, parse_policies
from coordinator.bench.measure import (
    RequestRecord,
    bound_met,
    measure,
    median_of,
    relative_errors,
    steady_throughput,
)
from coordinator.bench.report import headline, render_md, strict_json
from coordinator.bench.workset import draw_requests, num_probes
from coordinator.planner.workload import parse_workload


def record(start: float, n: int, step: float, enc: float = 0.1, arrival: float | None = None,
           target: int | None = None) -> RequestRecord:
    """A request encoded at ``start`` for ``enc`` s, then one token every ``step`` s."""
    first = start + enc
    toks = tuple(first + i * step for i in range(n))
    return RequestRecord(10, target or n, n, "length", None, arrival if arrival is not None
                         else 0.0, start, first, first, toks[-1], toks)


def test_percentile_bounds_of_a_known_static_sweep() -> None:
    lats = [float(x) for x in range(1, 11)]  # 1..10 s
    got = B.percentile_bounds(lats + [math.inf])  # a run with no p99-length request: skipped
    assert got[:3] == pytest.approx([1.9, 3.7, 7.3])
    assert got[3] is None
    with pytest.raises(ValueError, match="--bounds"):
        B.percentile_bounds([math.inf])


def test_measured_batches_fill_every_stream_twice() -> None:
    assert B.measured_batches(2, 48) == [1, 2, 4, 8]
    assert B.measured_batches(1, 3) == [1]
    assert B.measured_batches(2, 48, (8, 2, 8)) == [2, 8]
    assert B.bound_runs_requests(4, 2) == 16
    assert B.bound_runs_requests(1, 1) == 8


def test_steady_throughput_counts_admissions_after_warmup() -> None:
    starts = [0.0] * 2 + [1.0] * 2 + [2.0] * 2 + [3.0] * 2 + [4.0] * 2  # 2 per s, 10 requests
    finishes = [0.9, 0.95, 1.9, 1.95, 2.9, 2.95, 3.9, 3.95, 5.0, 5.0]
    assert steady_throughput(starts, finishes) == pytest.approx(2.0)
    assert steady_throughput([5.0] * 6, [6.0] * 6) is None  # one batch
    assert steady_throughput(starts, [4.5] * 10) is None  # queue dry before a finish
    # the last batch admitted microseconds apart is one admission, not a 3e4 seq/s rate
    burst = [0.0] + [3.0 + i * 1e-6 for i in range(10)]
    assert steady_throughput(burst, [1.0] * 11) is None


def test_steady_throughput_keeps_a_burst_whole() -> None:
    """Two lock-stepped streams admit 4 requests each 1 ms apart after the same finish, every
    second: 8 per s. A window starting at the 20%-th admission (the second stream's) must not
    drop the first stream's 4 from the count; nor may the last burst be half counted."""
    starts, finishes = [], []
    for cycle in range(8):
        starts += [cycle + 0.0] * 4 + [cycle + 0.001] * 4
        finishes += [cycle + 0.5] * 7 + [cycle + 0.999]
    starts, finishes = starts[:-4], finishes[:-4]  # the queue ran dry: one stream's last batch
    assert sorted(starts)[int(len(starts) * 0.2)] == pytest.approx(1.001)
    assert steady_throughput(starts, finishes) == pytest.approx(8.0)
    # a finish between two admissions splits them: the window starts at the second
    split = [0.0, 1.0, 1.5, 2.0, 3.0]
    assert steady_throughput(split, [0.9, 1.2, 1.9, 2.9, 4.0]) == pytest.approx(3 / 2.0)


def test_measure_p99_length_latency_and_bound() -> None:
    recs = [record(0.0, 20, 0.05), record(0.0, 5, 0.05), record(1.0, 20, 0.05),
            record(1.0, 3, 0.05)]
    m = measure(recs, s99=20, bound_s=1.2)
    # encode 0.1 s + 19 steps of 0.05 s to the 20th token
    assert m["latency_p99len_s"] == pytest.approx(1.05)
    assert m["p99len_requests"] == 2
    assert m["latency_p99len_sem_s"] == pytest.approx(0.0, abs=1e-12)  # both took 1.05 s
    slow = measure([*recs, record(2.0, 20, 0.08)], s99=20, bound_s=None)
    lats = [1.05, 1.05, 0.1 + 19 * 0.08]  # sample sd / sqrt(3)
    mean = sum(lats) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in lats) / 2)
    assert slow["latency_p99len_sem_s"] == pytest.approx(sd / math.sqrt(3))
    assert measure(recs[1:], s99=20, bound_s=None)["latency_p99len_sem_s"] is None  # one
    assert m["bound_met"] is True
    assert measure(recs, s99=20, bound_s=1.0)["bound_met"] is False
    assert m["ttft_s"] == pytest.approx(0.1)
    assert m["tpot_s"] == pytest.approx(0.05)
    assert m["ok"] == 4 and m["failed"] == 0
    assert m["throughput_tok_s"] == pytest.approx(m["throughput_seq_s"] * 12)


def test_measure_failures_and_missing_probes() -> None:
    bad = RequestRecord(10, 5, 0, None, "Timeout: no answer")
    m = measure([record(0.0, 4, 0.1), bad], s99=10, bound_s=None)
    assert m["failed"] == 1 and m["latency_p99len_s"] is None and m["bound_met"] is False
    assert bound_met(None, 5.0, 0) is False
    assert bound_met(None, None, 0) is True
    empty = measure([bad], s99=10, bound_s=None)
    assert empty["throughput_seq_s"] is None and empty["bound_met"] is False


def test_relative_errors_and_median() -> None:
    err = relative_errors({"throughput_seq_s": 2.0, "latency_p99len_s": math.inf},
                          {"throughput_seq_s": 1.5, "latency_p99len_s": 3.0})
    assert err["throughput_seq_s"] == pytest.approx(-0.25)
    assert err["latency_p99len_s"] is None and err["ttft_s"] is None
    # a static plan's SLA-(b) runs to the maximum length; the measured figure is compared with
    # its prediction of the p99-th token instead
    static = relative_errors({"latency_p99len_s": 8.0, "latency_to_p99_token_s": 4.0},
                             {"latency_p99len_s": 5.0})
    assert static["latency_p99len_s"] == pytest.approx(0.25)
    med = median_of([{"x": 1.0, "tpot_s": 0.2, "bound_met": True},
                     {"x": 3.0, "tpot_s": 0.1, "bound_met": True},
                     {"x": 2.0, "tpot_s": 0.4, "bound_met": False}])
    assert med["x"] == 2.0 and med["bound_met"] is False
    assert med["tpot_s"] == 0.2 and med["range"] == {"tpot_s": [0.1, 0.4]}  # compared only


def test_request_draw_is_seeded_and_has_probes() -> None:
    wl = parse_workload("S")
    a = draw_requests(wl, 30, 7, 1000)
    assert a == draw_requests(wl, 30, 7, 1000)
    assert a != draw_requests(wl, 30, 8, 1000)
    probes = [r for r in a if r.probe]
    assert len(probes) == num_probes(30) == 2
    assert all(r.output_len >= wl.p99_output for r in probes)
    assert all(100 <= t < 1000 for r in a for t in r.prompt_ids)
    capped = draw_requests(wl, 30, 7, 1000, max_context=96)
    assert all(len(r.prompt_ids) + r.output_len <= 96 for r in capped)


def test_config_parsing_rejects_bad_input() -> None:
    assert parse_bounds("auto") == "auto"
    assert parse_bounds("1.5, inf") == (1.5, None)
    for bad in ("x", "-1", "0", ""):
        with pytest.raises(ValueError, match="--bounds"):
            parse_bounds(bad)
    assert parse_policies("exegpt,static") == ("exegpt", "static")
    with pytest.raises(ValueError, match="unknown"):
        parse_policies("exegpt,orca")
    with pytest.raises(ValueError, match="twice"):
        parse_policies("static,static")
    with pytest.raises(ValueError, match="requests"):
        BenchConfig(model="tiny-llama", requests=1)


def _row(bound: float | None, policy: str, thr: float, met: bool) -> dict:
    return {"bound_s": bound, "policy": policy, "note": "", "plan": {"policy": policy},
            "fills": bound is not None,
            "predicted": {"throughput_seq_s": thr * 1.1},
            "measured": {"throughput_seq_s": thr, "bound_met": met},
            "error": {"throughput_seq_s": -0.1 / 1.1, "latency_p99len_s": None}}


def test_headline_does_not_count_misses_as_wins() -> None:
    rows = [_row(1.0, "exegpt", 3.0, False), _row(1.0, "static", 1.0, True),
            _row(2.0, "exegpt", 4.0, True), _row(2.0, "static", 2.0, True),
            _row(2.0, "continuous", 2.0, True), _row(None, "exegpt", 6.0, True),
            _row(None, "static", 2.0, True)]
    h = headline(rows)
    assert h["per_bound"][0]["vs_static"] == pytest.approx(3.0)  # reported ...
    assert h["mean_vs_static_met"] == pytest.approx(2.5)  # ... but not counted (2x, 3x)
    assert h["mean_vs_continuous_two_tightest_met"] == pytest.approx(2.0)
    assert h["misses"] == [1.0]
    assert h["abs_error"]["throughput_seq_s"]["rows"] == 5  # the no-bound rows K cannot fill
    assert h["abs_error"]["throughput_seq_s"]["mean"] == pytest.approx(0.1 / 1.1)
    results = {"meta": {"model": "m", "null_model": True, "dtype": "bfloat16",
                        "workload_description": "w", "requests": 4, "probes": 1,
                        "p99_output": 9, "profile": "p",
                        "config": {"workers": 2, "repeats": 1, "natural_eos": False},
                        "machine": {"num_cpus": 2, "load_avg_1_5_15": [1.0, 1.0, 1.0]}},
               "bounds": {"mode": "given", "bounds": [1.0, 2.0, None]}, "rows": rows,
               "reference": {"skipped": "null"}}
    md = render_md(results)
    assert "## bound 1 s" in md and "**no**" in md and "3.00x" in md


def test_strict_json_has_no_infinities(tmp_path: Path) -> None:
    tree = strict_json({"a": [math.inf, 1.0], "b": {"c": math.nan}})
    assert tree == {"a": [None, 1.0], "b": {"c": None}}
    (tmp_path / "x.json").write_text(json.dumps(tree, allow_nan=False))
