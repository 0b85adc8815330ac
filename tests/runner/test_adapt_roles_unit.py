"""The WAA role switch's state machine in process (no sockets, no workers): which workers
move, drain and migrate, the re-Assign, a stale token of the old run, Ready in the new role;
what the adapter cannot switch live and why."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

from common import protocol as P
from coordinator.adapt_roles import RoleSwitch, RoleTarget, roles_target, served_plan
from coordinator.config import CoordinatorConfig
from coordinator.membership import Membership
from coordinator.planner.plan import Plan, WorkerGroup
from coordinator.registry import WorkerState
from coordinator.server import Coordinator
from tests.runner.fakewaa import waa_coordinator
from tests.runner.test_pipeline_driver import Log, Sock


def _mesh(encoders: dict[str, str | None], decoders: list[str]) -> tuple[Coordinator, Sock]:
    """A serving WAA coordinator: encoders (id -> KV endpoint or None) and decoders."""
    co, workers, _ = waa_coordinator(encoders, decoders)
    return co, workers


def _plan(num_encoders: int, num_decoders: int, tp: int = 1) -> Plan:
    groups = (WorkerGroup("encoder", num_encoders, tp, (0, 2)),
              WorkerGroup("decoder", num_decoders, tp, (0, 2)))
    return Plan(policy="waa-c", model={}, workload="t", latency_bound_s=1.0, sla="b",
                num_workers=num_encoders + num_decoders, worker_groups=groups, B_E=4,
                B_D=4.0, N_D=None, B_m=1, microbatches=1, adjust={}, predicted={},
                search={}, profile_meta={})


def _adapter(switch: RoleSwitch) -> Any:
    """What the coordinator asks of its adapter here: the role switch (a Ready), finishes."""
    return SimpleNamespace(roles=switch, observe_finish=lambda *a, **kw: None)


def _tokens(co: Coordinator, decoder: str, wire_id: str, tokens: tuple[int, ...]) -> None:
    co.members._dispatch(co.members.registry.get(decoder), P.DecodeTokens(
        worker_id=decoder, step=1, t_emitted=0.0,
        updates=(P.TokenUpdate(wire_id, tokens),)))


def test_a_decoder_becomes_an_encoder_and_its_request_is_re_run_exactly_once() -> None:
    co, workers = _mesh({"enc0": None}, ["dec0", "dec1", "dec2"])
    co.on_submit(b"client", P.Submit(req_id="a", prompt=None, prompt_ids=(5, 6),
                                     max_new_tokens=6))
    co.schedule()
    [(_, batch)] = workers.take(P.EncodeBatch)
    holder = batch.requests[0].decoder_id
    _tokens(co, holder, "a", (7, 8))  # first token + one decode step reached the client
    target = roles_target(co, _plan(1, 3), _plan(2, 2))
    assert isinstance(target, RoleTarget) and len(target.moves) == 1
    # the least loaded decoder moves: here a busy one, to exercise the migration
    target = RoleTarget(((holder, "encoder"),), target.plan)
    done: list[dict[str, Any]] = []
    switch = RoleSwitch(co, target, 1, 0.0, done.append)
    co.adapter = _adapter(switch)
    assert co.members.registry.get(holder).state is WorkerState.ASSIGNED  # out of placement
    switch.step()  # drain timeout 0: "a" is migrated, the worker re-assigned
    request = co.table.get("a")
    assert request.state.value == "queued" and request.tokens == [7, 8] and request.attempt == 1
    assert [(r, c.req_id) for r, c in workers.take(P.Cancel)] == [(holder.encode(), "a")]
    assigns = dict(workers.take(P.Assign))
    mine = assigns[holder.encode()]
    assert (mine.role, mine.config["role_switch"], mine.config["host_weights"]) == (
        "encoder", 1, False)
    assert holder not in assigns[b"enc0"].peers  # the encoder drops its KV route
    _tokens(co, holder, "a", (9,))  # a stale token of the old run: ignored
    assert co.table.get("a").tokens == [7, 8]
    assert not done and switch.waiting == [holder]
    co.members._dispatch(co.members.registry.get(holder), P.Ready(
        worker_id=holder, info={"role_switch": 1, "reload_s": 0.25}))
    assert done and done[0]["ok"] and done[0]["migrated_requests"] == 1
    assert done[0]["rerun_tokens"] == 2 and done[0]["reload_s"] == 0.25
    assert sorted(w.role for w in co.members.ready("encoder")) == ["encoder", "encoder"]
    co.schedule()  # the re-run: prompt + the streamed tokens, only the tokens still owed
    [(_, rerun)] = workers.take(P.EncodeBatch)
    item = rerun.requests[0]
    assert (item.req_id, item.prompt_ids, item.max_new_tokens, item.output_offset) == (
        "a~rerun1", (5, 6, 7, 8), 4, 2)


def test_an_encoder_becomes_a_decoder_once_its_batch_reached_a_decoder() -> None:
    co, workers = _mesh({"enc0": "ipc:///tmp/kv-enc0", "enc1": "ipc:///tmp/kv-enc1"},
                        ["dec0", "dec1"])
    co.on_submit(b"client", P.Submit(req_id="a", prompt=None, prompt_ids=(5, 6),
                                     max_new_tokens=3))
    co.schedule()
    [(route, batch)] = workers.take(P.EncodeBatch)
    target = RoleTarget(((route.decode(), "decoder"),), served_plan(_plan(1, 3), (1, 3),
                                                                    co.model))
    done: list[dict[str, Any]] = []
    switch = RoleSwitch(co, target, 2, 0.0, done.append)
    co.adapter = _adapter(switch)
    switch.step()
    assert not workers.take(P.Assign)  # its request has not reached its decoder yet
    _tokens(co, batch.requests[0].decoder_id, "a", (7,))
    switch.step()
    [(_, assign)] = [(r, a) for r, a in workers.take(P.Assign) if r == route]
    assert assign.role == "decoder" and assign.config["role_switch"] == 2
    co.members._dispatch(co.members.registry.get(route.decode()), P.Ready(
        worker_id=route.decode(), kv_endpoint=f"ipc:///tmp/kv-{route.decode()}",
        info={"role_switch": 2, "reload_s": 0.1}))
    assert done[0]["ok"] and done[0]["migrated_requests"] == 0 and done[0]["counts"] == [1, 3]
    switch.step()  # a late tick after the end: nothing more
    assert len(done) == 1
    other = "enc1" if route == b"enc0" else "enc0"
    refresh = [a for r, a in workers.take(P.Assign) if r == other.encode()]
    assert route.decode() in refresh[-1].peers  # the encoder learns the new decoder
    assert co.table.get("a").tokens == [7]  # the request never moved


def test_what_cannot_switch_roles_live_says_why() -> None:
    co, _ = _mesh({"enc0": None, "enc1": None}, ["dec0", "dec1"])
    assert "KV endpoint" in roles_target(co, _plan(2, 2), _plan(1, 3))
    assert "same encoder/decoder split" in roles_target(co, _plan(2, 2), _plan(2, 2))
    assert "tensor-parallel" in roles_target(co, _plan(2, 2), _plan(2, 2, tp=2))
    assert "4 of 4" in roles_target(co, _plan(2, 2), _plan(2, 3))


def test_an_encoder_decoder_models_request_migrates_and_replays_from_its_prompt() -> None:
    """T5: the streamed tokens are decoder-side, so the migrated request is re-encoded from
    its prompt alone and its first tokens are replayed (checked, not sent again)."""
    co, workers = _mesh({"enc0": None}, ["dec0", "dec1", "dec2"])
    co.model = dataclasses.replace(co.model, family="t5", num_encoder_layers=2)
    co.table.encoder_decoder = True  # as a Coordinator serving a T5 model sets it
    co.on_submit(b"client", P.Submit(req_id="a", prompt=None, prompt_ids=(5, 6),
                                     max_new_tokens=3))
    co.schedule()
    [(_, batch)] = workers.take(P.EncodeBatch)
    holder = batch.requests[0].decoder_id
    _tokens(co, holder, "a", (7,))
    target = RoleTarget(((holder, "encoder"),), _plan(2, 2))
    done: list[dict[str, Any]] = []
    switch = RoleSwitch(co, target, 3, 0.0, done.append)
    co.adapter = _adapter(switch)
    switch.step()  # drain timeout 0: migrated at once, the worker re-assigned
    [(route, assign)] = workers.take(P.Assign)[-1:]
    assert route == holder.encode() and assign.config["role_switch"] == 3
    assert co.table.get("a").attempt == 1
    co.schedule()
    [(_, rerun)] = workers.take(P.EncodeBatch)
    item = rerun.requests[0]
    assert (item.req_id, item.prompt_ids, item.max_new_tokens, item.output_offset) == (
        "a~rerun1", (5, 6), 3, 0)
    _tokens(co, item.decoder_id, "a~rerun1", (7, 8))  # 7 replayed, 8 new
    assert co.table.get("a").tokens == [7, 8]


def test_a_restarted_adapting_coordinator_serves_the_switched_split() -> None:
    """Launched 1 + 3, switched to 2 + 2, coordinator restarted: the workers re-register with
    their current roles; an adapting coordinator serves them, a plain one waits."""
    for adapt, serving in ((False, False), (True, True)):
        cfg = CoordinatorConfig("ipc:///tmp/c", "ipc:///tmp/w", policy="waa",
                                num_encoders=1, num_decoders=3, adapt=adapt,
                                plan="plan.json" if adapt else None,
                                profile="analytic:a40:x" if adapt else None)
        co = Coordinator(dataclasses.replace(cfg, adapt=False, plan=None, profile=None), Log())
        co.client_endpoint = co.worker_endpoint = "ipc:///tmp/x"
        co.members = Membership(co, Sock())  # type: ignore[arg-type]
        co.members.cfg = cfg  # (an adapting Coordinator would start its planner process)
        for worker, role in (("w0", "encoder"), ("w1", "encoder"), ("w2", "decoder"),
                             ("w3", "decoder")):
            co.members.on_hello(worker.encode(), P.Hello(worker_id=worker, role=role,
                                                         kv_endpoint=f"ipc:///tmp/{worker}"))
            co.members._dispatch(co.members.registry.get(worker),
                                 P.Ready(worker_id=worker, kv_endpoint=f"ipc:///tmp/{worker}"))
        assert co.members.serving is serving
