"""The live re-layout's state machine in process (no sockets, no workers): drain and migrate,
re-Assign (with a spare), Ready again, the new streams; what the adapter cannot re-lay out."""

from __future__ import annotations

import time
from typing import Any

from common import protocol as P
from coordinator.adapt_relayout import relayout_target
from coordinator.pipeline_driver import StageLayout
from coordinator.planner.plan import Plan, WorkerGroup
from coordinator.relayout import Relayout, RelayoutConfig
from coordinator.streams import StreamKnobs
from tests.runner.test_pipeline_driver import _serving, _submit


def _ready(co: Any, worker: str, info: dict[str, Any]) -> None:
    co.members._dispatch(co.members.registry.get(worker),
                         P.Ready(worker_id=worker, kv_endpoint=f"ipc:///tmp/{worker}", info=info))


def _first_token(co: Any, workers: Any) -> None:
    """Request "a" encoded on the 2-stage layout; its first token (7) relayed."""
    _submit(co, "a", n=5)
    co.schedule()
    [(_, sp)] = workers.take(P.StagePass)
    co.members._dispatch(co.members.registry.get("stage1"), P.PassDone(
        worker_id="stage1", pass_id=sp.pass_id, stream=sp.stream, kind="encode",
        updates=(P.TokenUpdate("a", (7,)),)))


def test_two_stages_become_one_and_a_running_request_is_migrated() -> None:
    co, workers, clients = _serving()
    workers.sent.clear()
    _first_token(co, workers)
    done: list[dict[str, Any]] = []
    driver = co.pipeline
    driver.switch = Relayout(driver, StageLayout(((0, 2),)), 3, StreamKnobs("static", 4), 1,
                             done.append, RelayoutConfig(drain_timeout_s=0.0))
    _submit(co, "b", n=2)  # an arrival during the switch queues; it is not refused
    assert not clients.take(P.Error) and co.members.can_serve()
    co.schedule()  # drain over at once: "a" migrates, then every worker is re-assigned
    assert not workers.take(P.StagePass)
    assigns = {route: a for route, a in workers.take(P.Assign)}
    assert (assigns[b"s0"].layer_range, assigns[b"s0"].config["pipeline"],
            assigns[b"s0"].config["relayout"]) == ((0, 2), {"stage": 0, "num_stages": 1}, 1)
    assert assigns[b"s0"].peers == {}  # nothing READY yet: no stale "next"
    assert assigns[b"s1"].config["pipeline"] is None  # stage1 is a spare now
    assert co.table.get("a").state.value == "queued" and co.table.get("a").tokens == [7]
    _ready(co, "stage0", {"relayout": 1, "reload_s": 0.25})
    co.schedule()
    assert not done  # the spare has not answered yet
    _ready(co, "stage1", {"relayout": 0})  # a stale epoch does not count
    co.schedule()
    assert not done
    _ready(co, "stage1", {"relayout": 1, "reload_s": 0.0})
    co.schedule()  # done: the new single stage encodes the migrated request first
    [cost] = done
    assert cost["ok"] and cost["migrated_requests"] == 1 and cost["rerun_tokens"] == 1
    assert cost["reload_s"] == 0.25 and cost["stages"] == [[0, 2]] and cost["streams"] == 3
    assert driver.switch is None and len(driver.streams) == 3
    [(route, sp)] = workers.take(P.StagePass)
    assert route == b"s0" and sp.kind == "encode" and sp.req_ids == ("a", "b")
    migrated = sp.requests[0]
    assert (migrated.prompt_ids, migrated.output_offset, migrated.max_new_tokens) == (
        (5, 6, 7), 1, 4)
    co.members._dispatch(co.members.registry.get("stage0"), P.PassDone(
        worker_id="stage0", pass_id=sp.pass_id, stream=sp.stream, kind="encode",
        updates=(P.TokenUpdate("a", (8,)), P.TokenUpdate("b", (3,)))))
    assert co.table.get("a").tokens == [7, 8]  # the stream continues at the next index
    assert co.pipeline.describe()["stages"] == [[0, 2]]


def test_a_worker_that_never_says_ready_fails_the_switch() -> None:
    co, workers, _ = _serving()
    done: list[dict[str, Any]] = []
    driver = co.pipeline
    driver.switch = Relayout(driver, StageLayout(((0, 1), (1, 2))), 2,
                             StreamKnobs("static", 4), 7, done.append,
                             RelayoutConfig(drain_timeout_s=0.0, ready_timeout_s=0.01))
    co.schedule()
    time.sleep(0.02)
    co.schedule()
    [cost] = done
    assert not cost["ok"] and "did not say Ready" in cost["error"] and driver.switch is None


def test_a_worker_lost_mid_switch_fails_it_at_once() -> None:
    co, _, _ = _serving()
    done: list[dict[str, Any]] = []
    driver = co.pipeline
    driver.switch = Relayout(driver, StageLayout(((0, 2),)), 1, StreamKnobs("static", 4), 2,
                             done.append, RelayoutConfig(drain_timeout_s=0.0))
    co.schedule()  # re-assigned; now stage1 dies before its Ready
    co.members.lose(co.members.registry.get("stage1"), "test")
    [cost] = done
    assert not cost["ok"] and "stage1 was lost" in cost["error"] and driver.switch is None


def _plan(groups: tuple[WorkerGroup, ...], policy: str = "rra") -> Plan:
    return Plan(policy=policy, model={}, workload="t", latency_bound_s=1.0, sla="b",
                num_workers=sum(g.count for g in groups), worker_groups=groups, B_E=4,
                B_D=4.0, N_D=2, B_m=None, microbatches=len(groups), adjust={}, predicted={},
                search={}, profile_meta={})


def test_what_cannot_be_re_laid_out_says_why() -> None:
    co, _, _ = _serving()
    served = _plan((WorkerGroup("pipeline", 1, 1, (0, 1)), WorkerGroup("pipeline", 1, 1, (1, 2))))
    one = _plan((WorkerGroup("pipeline", 1, 1, (0, 2)),))
    layout, streams = relayout_target(co, served, one)  # type: ignore[misc]
    assert layout.layers == ((0, 2),) and streams == 1
    tp = _plan((WorkerGroup("pipeline", 2, 2, (0, 2)),))  # tp changes: relayout_tp
    assert relayout_target(co, served, tp)[0].tp == (2,)  # type: ignore[union-attr]
    assert relayout_target(co, tp, one)[0].tp == (1,)  # type: ignore[union-attr]
    big = _plan((WorkerGroup("pipeline", 4, 4, (0, 2)),))
    assert "needs 4 stage workers" in relayout_target(co, served, big)
    three = _plan(tuple(WorkerGroup("pipeline", 1, 1, r) for r in ((0, 1), (1, 2), (2, 2))))
    assert "3 stages, 2 stage workers" in relayout_target(co, served, three)
    gap = _plan((WorkerGroup("pipeline", 1, 1, (0, 1)), WorkerGroup("pipeline", 1, 1, (0, 2))))
    assert "contiguous" in relayout_target(co, served, gap)
    waa = _plan((WorkerGroup("encoder", 1, 1, (0, 2)), WorkerGroup("decoder", 1, 1, (0, 2))),
                policy="waa-c")
    assert "WAA and pipeline families" in relayout_target(co, served, waa)
