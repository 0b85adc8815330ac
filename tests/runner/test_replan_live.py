"""Re-planning for the workers that remain (coordinator/replan_live.py): the planner job on a
fixed WAA split, and the trigger / debounce / discard / apply logic without processes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from coordinator import replan_live
from coordinator.adjust import BatchSizer
from coordinator.planner import simulator
from coordinator.planner.analytic import parse_profile_arg
from coordinator.planner.candidate import Candidate, WorkloadStats
from coordinator.planner.costs import Costs
from coordinator.planner.plan import Plan
from coordinator.planner.planning import make_plan
from coordinator.planner.workload import parse_workload
from coordinator.replan_live import LiveReplanner, live_replan_job, role_counts

SMOL = "analytic:a40:smollm2-135m"
SHORT = "name=short;in=normal:64,32,128;out=normal:8,3,20"


@pytest.fixture(scope="module")
def plan_2e1d() -> Plan:
    """A WAA-C plan on 2 encoders + 1 decoder (the planner's own split on 3 workers may
    differ: the job fixes it, which is what it is for)."""
    two = make_plan(parse_workload(SHORT), parse_profile_arg(SMOL), 2, 0.3, policy="waa-c")
    out = live_replan_job(two.to_json(), SMOL, 2, 1, 0)
    return Plan.from_json(out["on_layout"])


def test_the_job_plans_on_the_live_split(plan_2e1d: Plan) -> None:
    assert role_counts(plan_2e1d) == (2, 1) and plan_2e1d.num_workers == 3
    for enc, dec in ((1, 1), (1, 3), (3, 1)):
        out = live_replan_job(plan_2e1d.to_json(), SMOL, enc, dec, 0)
        fit = Plan.from_json(out["on_layout"])
        assert role_counts(fit) == (enc, dec)
        assert (fit.policy, fit.latency_bound_s, fit.sla, fit.workload) == (
            plan_2e1d.policy, plan_2e1d.latency_bound_s, plan_2e1d.sla, plan_2e1d.workload)
        assert fit.predicted["throughput_seq_s"] > 0 and out["seconds"] > 0


def test_a_given_encoder_count_is_kept_and_checked() -> None:
    stats = WorkloadStats(parse_workload(SHORT))
    costs = Costs(parse_profile_arg(SMOL))
    chosen = simulator.waa_split(Candidate("waa-c", 4, B_E=8), stats, costs)
    given = 1 if chosen != 1 else 3
    assert simulator.waa_split(Candidate("waa-c", 4, B_E=8, num_encoders=given),
                               stats, costs) == given
    with pytest.raises(ValueError, match="num_encoders"):
        Candidate("waa-c", 4, num_encoders=4)


# ---- the coordinator side, on a fake coordinator ------------------------------------------
class _Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def info(self, event: str, **kw: Any) -> None:
        self.events.append((event, kw))

    warning = info

    def names(self) -> list[str]:
        return [name for name, _ in self.events]


class _Members:
    def __init__(self, encoders: int, decoders: int) -> None:
        self.alive = {"encoder": encoders, "decoder": decoders}

    def ready(self, role: str) -> list[SimpleNamespace]:
        return [SimpleNamespace(tp_size=1) for _ in range(self.alive[role])]


def _replanner(plan: Plan | None, *, profile: str | None = SMOL, pipeline: object = None,
               tmp_path: Path) -> tuple[LiveReplanner, SimpleNamespace, _Log]:
    path = None
    if plan is not None:
        path = tmp_path / "plan.json"
        path.write_text(plan.to_json())
    cfg = SimpleNamespace(plan=str(path) if path else None, profile=profile, policy="waa")
    co = SimpleNamespace(cfg=cfg, pipeline=pipeline, adapter=None, metrics=None,
                         members=_Members(2, 1),
                         sizer=BatchSizer(plan.B_E if plan else 8, cap=1 << 30))
    log = _Log()
    rp = LiveReplanner.from_coordinator(co, log)
    rp._pool = concurrent.futures.ThreadPoolExecutor(1)  # no planner process
    return rp, co, log


async def _until(cond: Any, timeout_s: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_a_burst_of_losses_makes_one_replan_applied_live(
        plan_2e1d: Plan, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replan_live, "DEBOUNCE_S", 0.2)
    calls: list[tuple[int, int]] = []

    def job(*args: Any) -> dict[str, Any]:
        calls.append((args[2], args[3]))
        return live_replan_job(*args)

    monkeypatch.setattr(replan_live, "live_replan_job", job)
    rp, co, log = _replanner(plan_2e1d, tmp_path=tmp_path)

    async def run() -> None:
        co.members.alive["encoder"] = 1
        rp.changed("loss", "enc0", "encoder")
        rp.changed("loss", "enc0.r1", "encoder")  # e.g. the rest of its TP group
        await _until(lambda: rp.counts["replan_after_loss"])
        await asyncio.sleep(0.3)  # no second re-plan comes

    asyncio.run(run())
    rp.close()
    assert calls == [(1, 1)]
    assert log.names() == ["replan_after_loss"]
    event = log.events[0][1]
    assert (event["encoders"], event["decoders"]) == (1, 1)
    assert event["outcome"] in ("switched", "confirmed")
    assert event["old"]["B_E"] == plan_2e1d.B_E and event["new"] is not None
    assert event["replan_s"] >= event["search_s"] > 0 and event["pause_s"] == 0.0
    assert role_counts(rp.served()) == (1, 1)  # type: ignore[arg-type]
    assert co.sizer.plan_batch == event["new"]["B_E"]
    band = co.sizer.decode_batch
    assert band is not None and band.hi == pytest.approx(event["new"]["decode_batch"][1])
    stats = rp.describe()
    assert stats["losses"] == 2 and stats["replan_after_loss"] == 1
    assert stats["recent"][-1]["encoders"] == 1 and not stats["replanning"]


def test_a_result_for_an_old_worker_set_is_discarded(
        plan_2e1d: Plan, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replan_live, "DEBOUNCE_S", 0.05)
    release = threading.Event()
    calls: list[tuple[int, int]] = []

    def job(*args: Any) -> dict[str, Any]:
        calls.append((args[2], args[3]))
        if len(calls) == 1:
            assert release.wait(10)  # the first search is still running when a worker joins
        return live_replan_job(*args)

    monkeypatch.setattr(replan_live, "live_replan_job", job)
    rp, co, log = _replanner(plan_2e1d, tmp_path=tmp_path)

    async def run() -> None:
        co.members.alive["encoder"] = 1
        rp.changed("loss", "enc0", "encoder")
        await _until(lambda: calls)
        co.members.alive["encoder"] = 2  # the replacement registers
        rp.changed("join", "enc2", "encoder")
        await asyncio.sleep(0.1)
        release.set()
        await _until(lambda: rp.counts["replan_after_join"])

    asyncio.run(run())
    rp.close()
    assert calls == [(1, 1), (2, 1)]
    assert log.names() == ["replan_discarded", "replan_after_join"]
    event = log.events[1][1]
    assert (event["encoders"], event["decoders"]) == (2, 1)
    assert event["outcome"] == "confirmed"  # back on the planned layout: its knobs
    assert rp.describe()["replan_discarded"] == 1 and rp.counts["replan_after_loss"] == 0


def test_without_a_profile_or_on_a_pipeline_it_skips_once_and_keeps_the_knobs(
        plan_2e1d: Plan, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replan_live, "DEBOUNCE_S", 0.02)
    for kwargs, why in (({"profile": None}, "no --profile"),
                        ({"pipeline": object()}, "lost stage's layers")):
        rp, co, log = _replanner(plan_2e1d, tmp_path=tmp_path, **kwargs)
        before = co.sizer

        async def run(rp: LiveReplanner = rp) -> None:
            for i in range(2):
                rp.changed("loss", f"w{i}", "encoder")
                await _until(lambda: not rp.describe()["replanning"])

        asyncio.run(run())
        rp.close()
        assert log.names() == ["replan_skipped"] and why in log.events[0][1]["why"]
        assert rp.counts["replan_skipped"] == 2 and co.sizer is before


def test_no_worker_of_a_role_left_skips_and_a_failed_job_keeps_the_knobs(
        plan_2e1d: Plan, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replan_live, "DEBOUNCE_S", 0.02)

    def crash(*args: Any) -> dict[str, Any]:
        raise RuntimeError("planner crashed")

    monkeypatch.setattr(replan_live, "live_replan_job", crash)
    rp, co, log = _replanner(plan_2e1d, tmp_path=tmp_path)
    before = co.sizer

    async def run() -> None:
        co.members.alive["decoder"] = 0
        rp.changed("loss", "dec0", "decoder")
        await _until(lambda: rp.counts["replan_skipped"])
        co.members.alive["decoder"] = 1
        rp.changed("join", "dec1", "decoder")
        await _until(lambda: rp.counts["replan_failed"])

    asyncio.run(run())
    rp.close()
    assert log.names() == ["replan_skipped", "replan_failed"]
    assert "no decoder worker is left" in log.events[0][1]["why"]
    assert co.sizer is before and rp.served() is rp.plan
