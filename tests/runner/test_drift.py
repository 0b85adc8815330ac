"""Drift detector (coordinator/drift.py) and the re-plan job (coordinator/adapt.py), no processes.

Streams are simulated in decode steps: each step Poisson(1) requests arrive and every running
request gains one token, so in-flight requests are censored exactly as on a WAA decoder."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from coordinator import drift
from coordinator.adapt import AdaptConfig, Adapter, layout, profile_correction, replan_job
from coordinator.adjust import BatchSizer
from coordinator.drift import (
    DriftConfig,
    DriftDetector,
    KaplanMeier,
    Reference,
    logrank,
    observed_spec,
)
from coordinator.planner.analytic import parse_profile_arg
from coordinator.planner.plan import Plan
from coordinator.planner.planning import make_plan
from coordinator.planner.workload import parse_workload
from coordinator.streams import Stream, StreamKnobs

S_OUT_T = "in=normal:256,252,512;out=normal:128,68,320"  # S inputs, T outputs
# measured over 20 seeds (docs/adaptation.md): S->T outputs 76-100 requests, S->T (both
# lengths) 68-92, outputs -30% 148-188
SHIFT_BOUND = 150
SHORTER_BOUND = 300


def simulate(ref: str, phases: list[tuple[str, int]], seed: int,
             cfg: DriftConfig | None = None) -> tuple[list[int], DriftDetector]:
    """Arrival counts at which the detector fired (rebasing to the same law after each)."""
    rng = np.random.default_rng(seed)
    det = DriftDetector(Reference.from_workload(parse_workload(ref)), cfg)
    work: list[tuple[int, int]] = []
    for spec, num in phases:
        ins, outs = parse_workload(spec).sample(rng, num)
        work += list(zip(ins.tolist(), outs.tolist(), strict=True))
    live: dict[str, list[int]] = {}
    fires: list[int] = []
    step, i = 0, 0
    while i < len(work) or live:
        for _ in range(rng.poisson(1.0)):
            if i >= len(work):
                break
            rec = [0, work[i][1]]
            live[f"r{i}"] = rec
            det.window.arrive(f"r{i}", work[i][0], lambda rec=rec: rec[0])
            i += 1
            if det.due() and det.evaluate(step * 0.01):
                fires.append(i)
                det.rebase(det.reference, step * 0.01)
        for key, rec in list(live.items()):
            rec[0] += 1
            if rec[0] >= rec[1]:
                det.window.finish(key, rec[0])
                del live[key]
        step += 1
    return fires, det


def test_kaplan_meier_by_hand() -> None:
    # exact 1, 2, 2; censored at 1 (S > 1) and at 3 (S > 3)
    km = KaplanMeier.fit(np.array([1, 2, 2, 1, 3]), np.array([True, True, True, False, False]))
    assert km.at_risk.tolist() == [5, 3, 1]
    # P(S>=1)=1, P(S>=2)=1-1/5, P(S>=3)=0.8*(1-2/3); tail P(S>3) = that * (1-0/1)
    assert km.surv == pytest.approx([1.0, 0.8, 0.8 / 3])
    assert km.tail == pytest.approx(0.8 / 3)


def test_logrank_is_calibrated_with_and_without_censoring() -> None:
    wl = parse_workload("S")
    rng = np.random.default_rng(0)
    plain, censored = [], []
    for _ in range(400):
        s = wl.output.sample(rng, 256)
        plain.append(logrank(KaplanMeier.fit(s, np.ones(256, bool)), wl.output, None)[0])
        c = rng.integers(0, 100, 256)
        censored.append(logrank(KaplanMeier.fit(np.minimum(s, c), s <= c), wl.output, None)[0])
    for z in (np.array(plain), np.array(censored)):
        assert abs(z.mean()) < 0.15 and 0.85 < z.std() < 1.15


@pytest.mark.parametrize("preset", ["S", "T", "C1"])
def test_stationary_stream_never_fires(preset: str) -> None:
    for seed in range(3):
        fires, det = simulate(preset, [(preset, 1500)], seed)
        assert fires == [], (preset, seed, det.reasons)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["S", "T", "G", "C1", "C2"])
def test_stationary_stream_never_fires_many_seeds(preset: str) -> None:
    for seed in range(20):
        fires, det = simulate(preset, [(preset, 3000)], 100 + seed)
        assert fires == [], (preset, seed, det.reasons)


@pytest.mark.parametrize("after", [S_OUT_T, "T"])
def test_shift_to_longer_outputs_fires_within_bound(after: str) -> None:
    for seed in range(4):
        fires, det = simulate("S", [("S", 400), (after, 300)], seed)
        assert fires and 0 < fires[0] - 400 <= SHIFT_BOUND, (seed, fires)
        assert any("output" in r for r in det.reasons)


def test_shift_to_shorter_outputs_fires_within_bound() -> None:
    shorter = "in=normal:256,252,512;out=normal:22.4,9,56"  # mean -30%
    for seed in range(4):
        fires, det = simulate("S", [("S", 500), (shorter, 800)], seed)
        assert fires and 0 < fires[0] - 500 <= SHORTER_BOUND, (seed, fires)
        assert det.last is not None and det.last.effects["mean_output"] < -0.15


def test_small_shift_below_the_threshold_does_not_fire() -> None:
    smaller = "in=normal:256,252,512;out=normal:33.6,13.6,84"  # mean +5%
    for seed in range(2):
        fires, _ = simulate("S", [("S", 300), (smaller, 1500)], seed)
        assert fires == []


def _fake(effect: float, p: float) -> drift.Observation:
    empty = (np.array([1]), np.array([1.0]))
    return drift.Observation(100, {}, {}, {"mean_output": effect, "p99_output": effect,
                                           "mean_input": 0.0}, 0.0, 1.0, 0.0, p, empty)


def test_hysteresis_confirm_and_dwell(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = DriftConfig(window=64, min_samples=8, eval_every=1, confirm=3, min_dwell_s=5,
                      min_dwell_requests=10)
    det = DriftDetector(Reference.from_workload(parse_workload("S")), cfg)
    for i in range(8):
        det.window.arrive(f"r{i}", 10, None)
    seq = iter([(0.3, 1e-9), (0.3, 1e-9), (0.10, 1e-3),  # over, over, in the band: suspect
                (0.3, 1e-9),  # third over: fire
                (0.3, 1e-9), (0.3, 1e-9), (0.3, 1e-9)])  # cooldown: never fires
    monkeypatch.setattr(drift, "observe", lambda window, ref: _fake(*next(seq)))
    states = []
    for t in range(4):
        states.append((det.evaluate(float(t)), det.state))
    assert states == [(False, "suspect"), (False, "suspect"), (False, "suspect"),
                      (True, "fired")]
    det.rebase(det.reference, 3.0)
    for t in (4.0, 5.0, 20.0):  # 20 s passed but not 10 more arrivals: still cooling down
        assert det.evaluate(t) is False and det.state == "cooldown"
    for i in range(10):
        det.window.arrive(f"x{i}", 10, None)
    monkeypatch.setattr(drift, "observe", lambda window, ref: _fake(0.0, 0.5))
    assert det.evaluate(21.0) is False and det.state == "stable"
    # a clear (effects under clear_ratio x threshold) resets a suspicion
    monkeypatch.setattr(drift, "observe", lambda window, ref: _fake(0.3, 1e-9))
    det.evaluate(22.0)
    monkeypatch.setattr(drift, "observe", lambda window, ref: _fake(0.01, 0.5))
    det.evaluate(23.0)
    assert det.state == "stable" and det.suspect_since is None


def test_config_parse_and_errors() -> None:
    cfg = DriftConfig.parse("window=128,alpha=1e-3,min_dwell_s=2")
    assert (cfg.window, cfg.alpha, cfg.min_dwell_s) == (128, 1e-3, 2.0)
    with pytest.raises(ValueError, match="options"):
        DriftConfig.parse("windw=3")
    with pytest.raises(ValueError, match="number"):
        DriftConfig.parse("window=big")
    with pytest.raises(ValueError, match="min_samples"):
        DriftConfig(window=32, min_samples=64)


def test_observed_spec_is_a_workload_the_planner_reads() -> None:
    fires, det = simulate("S", [("S", 300), ("T", 400)], 0)
    obs = drift.observe(det.window, det.reference)
    wl = parse_workload(observed_spec(obs, det.window))
    assert fires and wl.name == "observed"
    # the re-plan's law: the window's Kaplan-Meier law, its censored tail extrapolated
    values, probs = obs.replan_output
    assert wl.output.mean == pytest.approx(float(values @ probs), rel=1e-3)
    assert wl.output.mean >= obs.output["mean"] - 1e-6
    assert wl.input.mean == pytest.approx(obs.input["mean"], rel=1e-9)
    assert wl.output.mean > 1.5 * parse_workload("S").output.mean  # T-like by now


def test_replan_job_keeps_the_layout_and_changes_knobs() -> None:
    short = "name=short;in=normal:64,32,128;out=normal:8,3,20"
    long = "name=long;in=normal:64,32,128;out=normal:32,17,80"
    profile = "analytic:a40:smollm2-135m"
    plan = make_plan(parse_workload(short), parse_profile_arg(profile), 2, 0.3, policy="waa-c")
    out = replan_job(plan.to_json(), profile, long)
    best = Plan.from_json(out["best"])
    assert layout(best) == layout(plan) and best.B_E < plan.B_E
    assert best.workload == long and out["on_layout"] is None


def test_replan_job_reports_a_relayout_and_the_best_knobs_on_the_current_one() -> None:
    # continuous batching on 4 A40s under 80 s: C1 is planned on two tp-2 stages, T would
    # rather have four tp-1 stages
    profile = "analytic:a40:opt-13b"
    plan = make_plan(parse_workload("C1"), parse_profile_arg(profile), 4, 80.0,
                     policy="continuous")
    out = replan_job(plan.to_json(), profile, "T")
    best, fit = Plan.from_json(out["best"]), Plan.from_json(out["on_layout"])
    assert layout(best) != layout(plan)
    assert layout(fit) == layout(plan) and fit.B_E != plan.B_E
    assert fit.predicted["latency_p99len_s"] <= 80.0 and fit.search.get("meets_bound", True)
    assert best.predicted["throughput_seq_s"] >= fit.predicted["throughput_seq_s"]


# ---- the adapter's switch logic (no coordinator process, no planner process) ----------------
class _Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def info(self, event: str, **kw: object) -> None:
        self.events.append((event, kw))

    warning = info

    def names(self) -> list[str]:
        return [name for name, _ in self.events]


SHORT = "name=short;in=normal:64,32,128;out=normal:8,3,20"
LONG = "name=long;in=normal:64,32,128;out=normal:32,17,80"
SMOL = "analytic:a40:smollm2-135m"


def _adapter(tmp_path: Path, plan: Plan, profile: str, monkeypatch: pytest.MonkeyPatch,
             pipeline: object = None) -> tuple[Adapter, SimpleNamespace, _Log]:
    monkeypatch.setattr(Adapter, "_ensure_pool", lambda self: None)  # no planner process
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    co = SimpleNamespace(sizer=BatchSizer(plan.B_E, cap=1 << 30), pipeline=pipeline)
    log = _Log()
    return Adapter(AdaptConfig(str(path), profile), co, log), co, log


def _pending(spec: str) -> dict:
    return {"t_fire": 100.0, "t_mono": time.perf_counter(), "spec": spec,
            "reasons": ["mean_output +300%"], "detect_s": 0.1, "detect_requests": 40,
            "detect_arrival": 500, "observed": {}}


def test_adapter_switches_waa_knobs_and_rebases(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    plan = make_plan(parse_workload(SHORT), parse_profile_arg(SMOL), 2, 0.3, policy="waa-c")
    adapter, co, log = _adapter(tmp_path, plan, SMOL, monkeypatch)
    result = replan_job(plan.to_json(), SMOL, LONG)
    adapter.apply(result, _pending(LONG), 101.0)
    new = Plan.from_json(result["best"])
    assert co.sizer.plan_batch == new.B_E < plan.B_E
    assert co.sizer.decode_batch is not None and co.sizer.decode_batch.hi == pytest.approx(
        new.adjust["decode_batch"][1])
    assert log.names() == ["plan_switch"]
    event = log.events[0][1]
    assert event["old"]["B_E"] == plan.B_E and event["new"]["B_E"] == new.B_E
    assert event["pause_s"] == 0.0 and event["switch_s"] == pytest.approx(1.0)
    assert adapter.detector.state == "cooldown"
    assert adapter.detector.reference.output.mean == pytest.approx(32, rel=0.02)
    assert adapter.describe()["knobs"]["B_E"] == new.B_E
    adapter.apply(replan_job(new.to_json(), SMOL, LONG), _pending(LONG), 102.0)
    assert log.names()[-1] == "replan_no_change" and len(adapter.switches) == 1


def test_adapter_keeps_the_layout_and_sets_pipeline_streams(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    profile = "analytic:a40:opt-13b"
    plan = make_plan(parse_workload("C1"), parse_profile_arg(profile), 4, 80.0,
                     policy="continuous")  # two tp-2 stages; T would rather have four tp-1
    streams = [Stream(i, StreamKnobs("continuous", plan.B_E)) for i in range(2)]
    adapter, co, log = _adapter(tmp_path, plan, profile, monkeypatch,
                                SimpleNamespace(streams=streams, switching=False))
    # no stage worker connected: the new plan's TP layout cannot be re-grouped, so it is kept
    co.model = SimpleNamespace(num_encoder_layers=0, num_layers=40)
    co.members = SimpleNamespace(registry=[])
    co.pipeline.co = co
    result = replan_job(plan.to_json(), profile, "T")
    adapter.apply(result, _pending("T"), 101.0)
    fit = Plan.from_json(result["on_layout"])
    assert log.names() == ["replan_needs_relayout", "plan_switch"]
    assert log.events[0][1]["throughput_gain"] > 0
    assert [s.knobs for s in streams] == [StreamKnobs("continuous", fit.B_E)] * 2
    assert layout(adapter.plan) == layout(plan)


def test_a_failed_replan_keeps_the_plan(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    plan = make_plan(parse_workload(SHORT), parse_profile_arg(SMOL), 2, 0.3, policy="waa-c")
    adapter, co, log = _adapter(tmp_path, plan, SMOL, monkeypatch)
    loop = asyncio.new_event_loop()
    try:
        future = loop.create_future()
        future.set_exception(RuntimeError("planner crashed"))
        adapter.pending = _pending(LONG)
        adapter._replanned(future)
    finally:
        loop.close()
    assert log.names() == ["replan_failed"] and adapter.pending is None
    assert co.sizer.plan_batch == plan.B_E and adapter.detector.state == "cooldown"


def test_adapter_observes_lengths_and_step_time_ratio(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    plan = make_plan(parse_workload(SHORT), parse_profile_arg(SMOL), 2, 0.3, policy="waa-c")
    adapter, _, _ = _adapter(tmp_path, plan, SMOL, monkeypatch)
    tpot = plan.predicted["tpot_s"]
    reqs = [SimpleNamespace(req_id=f"r{i}", num_prompt_tokens=10 + i, tokens=[],
                            times=SimpleNamespace(t_first_token=1.0, t_finish=None))
            for i in range(3)]
    for r in reqs:
        adapter.observe_arrival(r)
    reqs[0].tokens.extend([1, 2, 3])
    reqs[0].times.t_finish = 1.0 + 2 * 2 * tpot  # twice the predicted time per token
    adapter.observe_finish(reqs[0])
    reqs[1].tokens.extend([1, 2])
    adapter.observe_finish(reqs[1], exact=False)  # failed: a lower bound, no ratio
    reqs[2].tokens.append(7)  # in flight: read live
    lens, exact = adapter.detector.window.outputs()
    assert lens.tolist() == [3, 2, 1] and exact.tolist() == [True, False, False]
    assert adapter.detector.window.inputs().tolist() == [10, 11, 12]
    assert adapter.describe()["step_time_ratio"] == {"median": pytest.approx(2.0), "count": 1,
                                                     "reference": None}


def _finish(adapter: Adapter, i: int, ratio: float) -> None:
    """A request finished with 5 tokens at ``ratio`` x the served plan's predicted TPOT."""
    tpot = adapter.plan.predicted["tpot_s"]
    r = SimpleNamespace(req_id=f"q{i}", num_prompt_tokens=12, tokens=[],
                        times=SimpleNamespace(t_first_token=1.0, t_finish=None))
    adapter.observe_arrival(r)
    r.tokens.extend([1, 2, 3, 4, 5])
    r.times.t_finish = 1.0 + 4 * ratio * tpot
    adapter.observe_finish(r)


def test_a_drifted_step_time_ratio_corrects_the_replans_profile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ratio is arbitrary (an analytic A40 profile served here); its change since the plan
    went live is what scales the re-plan's profile, and a switch starts it afresh."""
    plan = make_plan(parse_workload(SHORT), parse_profile_arg(SMOL), 2, 0.3, policy="waa-c")
    adapter, _, _ = _adapter(tmp_path, plan, SMOL, monkeypatch)
    recent = adapter.cfg.drift.min_samples
    for i in range(recent):
        _finish(adapter, i, 40.0)  # a CPU serving an A40 plan: 40x, constant
    assert adapter.ratio_reference == pytest.approx(40.0)

    def correction() -> float | None:
        return profile_correction(adapter.step_ratios, adapter.ratio_reference,
                                  adapter.cfg.drift.ratio_shift, recent)

    for i in range(recent):
        _finish(adapter, recent + i, 44.0)  # +10%: within ratio_shift (20%)
    assert correction() is None
    for i in range(recent):
        _finish(adapter, 2 * recent + i, 60.0)  # the machine got 1.5x slower
    assert correction() == pytest.approx(1.5)
    adapter.plan = make_plan(parse_workload(LONG), parse_profile_arg(SMOL), 2, 0.3,
                             policy="waa-c")  # a switch: ratios against the new prediction
    _finish(adapter, 9999, 50.0)
    assert list(adapter.step_ratios) == [pytest.approx(50.0)]
    assert adapter.ratio_reference is None and correction() is None


def test_replan_job_on_a_corrected_profile() -> None:
    profile = parse_profile_arg(SMOL)
    plan = make_plan(parse_workload(SHORT), profile, 2, 1e18, policy="static")
    plain = replan_job(plan.to_json(), SMOL, LONG)
    slower = replan_job(plan.to_json(), SMOL, LONG, profile_scale=3.0)
    assert plain["profile_scale"] is None and slower["profile_scale"] == 3.0
    a, b = Plan.from_json(plain["best"]), Plan.from_json(slower["best"])
    assert b.profile_meta["calibration"]["factor"] == 3.0
    assert "calibration" not in a.profile_meta
    # every compute time x3: the same batch's time per token is 3x (a fixed part: none here)
    same = make_plan(parse_workload(LONG), profile, 2, 1e18, policy="static")
    assert a.B_D == same.B_D
    assert b.predicted["throughput_seq_s"] < a.predicted["throughput_seq_s"] / 2
