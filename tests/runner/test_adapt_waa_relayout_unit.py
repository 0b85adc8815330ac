"""A staged WAA mesh's live re-layout in process (no sockets, no workers): drain and migrate
(a new run: new wire id), re-Assign with the new sides / ranges / routes, Ready again, the new
micro-batches; the old run's id freed on the new decoder stages; what cannot switch says why."""

from __future__ import annotations

import dataclasses
from typing import Any

from common import protocol as P
from coordinator.adapt_relayout import relayout_target
from coordinator.config import CoordinatorConfig
from coordinator.membership import Membership
from coordinator.planner.plan import Plan, WorkerGroup
from coordinator.relayout import RelayoutConfig, WaaRelayout
from coordinator.server import Coordinator
from coordinator.waa_layout import WaaLayout
from tests.runner.test_pipeline_driver import Log, Relay, Sock
from tests.runner.test_waa_pipeline_driver import _done, _submit

NAMES = ("enc0", "dec0", "dec1", "dec2")
NEW = WaaLayout(((0, 15), (15, 30)), ((0, 15), (15, 30)))


def _serving(encoders: str = "0:30", decoders: str = "0:10,10:20,20:30",
             names: tuple[str, ...] = NAMES) -> tuple[Coordinator, Sock, Sock]:
    """smollm2-135m shapes (30 layers), by default: encoder stage [0, 30), decoder stages
    [0, 10), [10, 20), [20, 30) (one tp-1 worker each, ``names`` in stage order); B_E 2,
    B_m 1; every stage READY; adapting (host weights)."""
    cfg = CoordinatorConfig("ipc:///tmp/c", "ipc:///tmp/w", max_encode_batch=2, streams=1,
                            model_shape="smollm2-135m", waa_encoder_layers=encoders,
                            waa_decoder_layers=decoders)
    co = Coordinator(cfg, Log())
    workers, clients = Sock(), Sock()
    co.client_endpoint = co.worker_endpoint = "ipc:///tmp/x"
    co.relay = Relay(clients, co.log, co.counters)  # type: ignore[arg-type]
    co.members = Membership(co, workers)  # type: ignore[arg-type]
    for s, name in enumerate(names):
        co.members.on_hello(name.encode(), P.Hello(worker_id=name, role="pipeline",
                                                   capacity={"stage": s, "max_seqs": 8}))
    for name in names:
        _ready(co, name, {})
    workers.sent.clear()
    return co, workers, clients


def _ready(co: Coordinator, name: str, info: dict[str, Any]) -> None:
    co.members._dispatch(co.members.registry.get(name),
                         P.Ready(worker_id=name, kv_endpoint=f"ipc:///tmp/kv-{name}", info=info))


def test_split_changes_a_running_request_is_re_run_and_its_old_id_freed() -> None:
    co, workers, clients = _serving()
    driver = co.pipeline
    for r in "ab":
        _submit(co, r)
    co.schedule()
    [(_, enc)] = workers.take(P.StagePass)
    _done(co, "enc0", enc)  # first tokens (9): a and b join the micro-batch
    co.schedule()
    [(route, dec)] = workers.take(P.StagePass)
    assert route == b"dec0" and dec.req_ids == ("a", "b")
    done: list[dict[str, Any]] = []
    driver.switch = WaaRelayout(driver, NEW, 3, 1, done.append,
                                RelayoutConfig(drain_timeout_s=0.0))
    assert driver.switch.cost["drained_requests"] == 2
    _submit(co, "c")  # an arrival during the switch queues, it is not refused
    co.schedule()  # the decode pass in flight comes back first: nothing goes out
    assert not workers.take(P.StagePass) and not workers.take(P.Assign)
    assert co.members.can_serve() and not clients.take(P.Error)
    _done(co, "dec2", dec, finished=("a",))  # a ends; b is migrated, then the re-Assign
    co.schedule()
    assert not workers.take(P.StagePass)
    assigns = {route.decode(): a for route, a in workers.take(P.Assign)}
    waa = {w: (a.config["pipeline"]["waa"]["side"], a.layer_range, a.config["relayout"])
           for w, a in assigns.items()}
    assert waa == {"enc0": ("encoder", (0, 15), 1), "dec0": ("encoder", (15, 30), 1),
                   "dec1": ("decoder", (0, 15), 1), "dec2": ("decoder", (15, 30), 1)}
    assert all(a.peers == {} for a in assigns.values())  # nothing READY: no stale routes
    assert assigns["dec0"].config["pipeline"]["waa"]["routes"] == [["kv1", [15, 30]]]
    b = co.table.get("b")
    assert b.state.value == "queued" and b.wire_id == "b~rerun1" and b.tokens == [9, 9]
    for name in NAMES[:3]:
        _ready(co, name, {"relayout": 1, "reload_s": 0.5})
    _ready(co, "dec2", {"relayout": 0})  # a stale epoch does not count
    co.schedule()
    assert not done and not workers.take(P.StagePass)
    _ready(co, "dec2", {"relayout": 1, "reload_s": 0.25})
    co.schedule()  # done: peers refresh, the migrated run is encoded first
    [cost] = done
    assert cost["ok"] and cost["migrated_requests"] == 1 and cost["rerun_tokens"] == 2
    assert cost["stages"] == {"encoder": [[0, 15], [15, 30]], "decoder": [[0, 15], [15, 30]]}
    assert cost["reload_s"] == 0.5 and cost["streams"] == 3 and driver.switch is None
    refreshed = {route.decode(): a for route, a in workers.take(P.Assign)}
    assert refreshed["enc0"].peers == {"next": "ipc:///tmp/kv-dec0",
                                       "kv0": "ipc:///tmp/kv-dec1"}
    passes = [(route.decode(), sp) for route, sp in workers.take(P.StagePass)]
    [(_, encode)] = [p for p in passes if p[1].kind == "encode"]
    frees = [p for p in passes if p[1].kind == "decode"]
    assert encode.req_ids == ("b~rerun1", "c")
    rerun = encode.requests[0]
    assert (rerun.prompt_ids, rerun.output_offset, rerun.max_new_tokens) == ((5, 6, 7, 9, 9),
                                                                           2, 3)
    # the old run's id (a late KVHandoff of it is dropped) and a's pending free
    assert {r for _, sp in frees for r in sp.free} == {"a", "b"}
    assert all(route == "dec1" and not sp.req_ids for route, sp in frees)
    assert len(driver.micro) == 3 and driver.describe()["encoder_stages"] == [[0, 15], [15, 30]]
    _done(co, "dec0", encode)  # the new last encoder stage: b's stream continues at index 2
    assert co.table.get("b").tokens == [9, 9, 9]
    assert [m.req_id for _, m in clients.take(P.Result)] == ["a"]


def test_a_worker_lost_mid_switch_fails_it() -> None:
    co, _, _ = _serving()
    done: list[dict[str, Any]] = []
    driver = co.pipeline
    driver.switch = WaaRelayout(driver, NEW, 2, 4, done.append,
                                RelayoutConfig(drain_timeout_s=0.0))
    co.schedule()  # idle: re-assigned at once
    co.members.lose(co.members.registry.get("dec1"), "test")
    [cost] = done
    assert not cost["ok"] and "dec1 was lost" in cost["error"] and driver.switch is None


def _plan(groups: tuple[tuple[str, tuple[int, int]], ...], count: int = 1,
          tp: int = 1) -> Plan:
    wg = tuple(WorkerGroup(role, count, tp, rng) for role, rng in groups)
    return Plan(policy="waa-c", model={}, workload="t", latency_bound_s=1.0, sla="b",
                num_workers=len(wg) * count, worker_groups=wg, B_E=4, B_D=4.0, N_D=None, B_m=2,
                microbatches=2, adjust={}, predicted={}, search={}, profile_meta={})


def test_which_staged_waa_plans_can_be_re_laid_out_live() -> None:
    co, _, _ = _serving()
    served = _plan((("encoder", (0, 30)), ("decoder", (0, 10)), ("decoder", (10, 20)),
                    ("decoder", (20, 30))))
    layout, micro = relayout_target(co, served, _plan(  # type: ignore[misc]
        (("encoder", (0, 15)), ("encoder", (15, 30)), ("decoder", (0, 15)),
         ("decoder", (15, 30)))))
    assert layout == NEW and micro == 2
    three = _plan((("encoder", (0, 30)), ("decoder", (0, 15)), ("decoder", (15, 30))))
    assert "3 stages, 4 stage workers" in relayout_target(co, served, three)
    tp = _plan((("encoder", (0, 30)), ("decoder", (0, 30))), count=2, tp=2)  # re-grouped
    assert relayout_target(co, served, tp) == (WaaLayout(((0, 30),), ((0, 30),), tp=(2, 2)), 2)
    gap = _plan((("encoder", (0, 10)), ("encoder", (20, 30)), ("decoder", (0, 15)),
                 ("decoder", (15, 30))))
    assert "contiguous" in relayout_target(co, served, gap)
    rra = dataclasses.replace(_plan((("encoder", (0, 30)),)), policy="rra", worker_groups=(
        WorkerGroup("pipeline", 1, 1, (0, 30)),))
    assert "WAA and pipeline families" in relayout_target(co, served, rra)
