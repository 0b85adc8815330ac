"""T5 (encoder-decoder) live re-layout in process (no sockets, no workers): which new plans
the adapter accepts for a T5 pipeline and a staged T5 WAA mesh, and the pipeline switch
itself: the re-Assign carries both stacks' new ranges, a migrated request re-runs from its
prompt alone and replays the tokens the client has (never sent twice)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from common import protocol as P
from common.models.config import ModelConfig
from coordinator.adapt_relayout import relayout_target
from coordinator.config import CoordinatorConfig
from coordinator.membership import Membership
from coordinator.pipeline_driver import StageLayout
from coordinator.planner.plan import Plan, WorkerGroup
from coordinator.relayout import Relayout, RelayoutConfig, WaaRelayout
from coordinator.server import Coordinator
from coordinator.streams import StreamKnobs
from tests.runner.test_pipeline_driver import Log, Relay, Sock, _coordinator, _hello


def _t5_json(tmp: Path) -> str:
    """A T5 shape with 4 encoder and 4 decoder layers (room for uneven splits)."""
    model = dataclasses.replace(ModelConfig.preset("tiny-t5"), name="t5-44", num_layers=4,
                                num_encoder_layers=4)
    path = tmp / "t5.json"
    path.write_text(json.dumps(model.to_dict()))
    return str(path)


def _pipeline(tmp: Path) -> tuple[Coordinator, Sock, Sock]:
    """Two T5 stages (encoder and decoder layers [0, 2) and [2, 4) each), both READY."""
    co, workers, clients = _coordinator(model_config=_t5_json(tmp))
    for s in (0, 1):
        _hello(co, s)
    for s in (0, 1):
        _ready(co, f"stage{s}", {})
    workers.sent.clear()
    return co, workers, clients


def _ready(co: Coordinator, worker: str, info: dict[str, Any]) -> None:
    co.members._dispatch(co.members.registry.get(worker),
                         P.Ready(worker_id=worker, kv_endpoint=f"ipc:///tmp/{worker}", info=info))


def _chunks(co: Coordinator, clients: Sock) -> list[tuple[int, tuple[int, ...]]]:
    """The (index, tokens) of the StreamChunks the client got (the relay's batch flushed)."""
    co.relay.flush()
    return [(m.index, m.tokens) for _, m in clients.take(P.StreamChunk)]


def _plan(groups: tuple[WorkerGroup, ...], policy: str = "rra") -> Plan:
    return Plan(policy=policy, model={}, workload="t", latency_bound_s=1.0, sla="b",
                num_workers=sum(g.count for g in groups), worker_groups=groups, B_E=4,
                B_D=4.0, N_D=2, B_m=1, microbatches=len(groups), adjust={}, predicted={},
                search={}, profile_meta={})


def _stages(*split: tuple[tuple[int, int], tuple[int, int] | None]) -> Plan:
    """A pipeline plan of tp-1 stages, each (decoder layers, encoder layers)."""
    return _plan(tuple(WorkerGroup("pipeline", 1, 1, dec, enc) for dec, enc in split))


def test_t5_pipeline_targets_carry_both_stacks_and_bad_ones_say_why(tmp_path: Path) -> None:
    co, _, _ = _pipeline(tmp_path)
    served = _stages(((0, 2), (0, 2)), ((2, 4), (2, 4)))
    layout, streams = relayout_target(co, served, _stages(((0, 3), (0, 1)),  # type: ignore[misc]
                                                          ((3, 4), (1, 4))))
    assert (layout.layers, layout.encoder_layers, streams) == (((0, 3), (3, 4)),
                                                               ((0, 1), (1, 4)), 2)
    one, _ = relayout_target(co, served, _stages(((0, 4), (0, 4))))  # type: ignore[misc]
    assert one.encoder_layers == ((0, 4),)  # the other worker becomes a spare
    assert "no encoder_layer_range" in relayout_target(
        co, served, _stages(((0, 2), (0, 2)), ((2, 4), None)))
    # the planner gives a stage no encoder layer when stages outnumber them: a T5 stage
    # needs some of each stack
    assert "non-empty" in relayout_target(co, served, _stages(((0, 2), (0, 4)), ((2, 4), (4, 4))))
    assert "cover layers 0..3" in relayout_target(
        co, served, _stages(((0, 2), (0, 1)), ((2, 4), (1, 3))))
    tp = _plan((WorkerGroup("pipeline", 2, 2, (0, 4), (0, 4)),))  # re-grouped: relayout_tp
    tp_layout, _ = relayout_target(co, served, tp)  # type: ignore[misc]
    assert (tp_layout.tp, tp_layout.encoder_layers) == ((2,), ((0, 4),))


def test_t5_stages_are_re_laid_out_and_a_migrated_request_replays(tmp_path: Path) -> None:
    co, workers, clients = _pipeline(tmp_path)
    co.on_submit(b"client", P.Submit(req_id="a", prompt_ids=(5, 6), max_new_tokens=5,
                                     stream=True))
    co.schedule()
    [(_, sp)] = workers.take(P.StagePass)
    stage1 = co.members.registry.get("stage1")
    co.members._dispatch(stage1, P.PassDone(worker_id="stage1", pass_id=sp.pass_id,
                                            stream=sp.stream, kind="encode",
                                            updates=(P.TokenUpdate("a", (7,)),)))
    assert _chunks(co, clients) == [(0, (7,))]
    done: list[dict[str, Any]] = []
    driver = co.pipeline
    new = StageLayout(((0, 3), (3, 4)), ((0, 1), (1, 4)))
    driver.switch = Relayout(driver, new, 2, StreamKnobs("static", 4), 1, done.append,
                             RelayoutConfig(drain_timeout_s=0.0))
    co.schedule()  # drain over at once: "a" migrates, every worker is re-assigned
    assigns = {route: a for route, a in workers.take(P.Assign)}
    assert [(a.layer_range, a.encoder_layer_range, a.config["relayout"])
            for a in (assigns[b"s0"], assigns[b"s1"])] == [((0, 3), (0, 1), 1),
                                                          ((3, 4), (1, 4), 1)]
    for s in (0, 1):
        _ready(co, f"stage{s}", {"relayout": 1, "reload_s": 0.1})
    co.schedule()
    [cost] = done
    assert cost["ok"] and cost["migrated_requests"] == 1 and cost["rerun_tokens"] == 1
    assert cost["stages"] == [[0, 3], [3, 4]] and cost["encoder_stages"] == [[0, 1], [1, 4]]
    refresh = [a for _, a in workers.take(P.Assign)]
    assert refresh and all(a.encoder_layer_range == (0, 1) for a in refresh if a.group == 0)
    [(route, sp)] = workers.take(P.StagePass)
    rerun = sp.requests[0]  # from the prompt alone: T5's output tokens are decoder-side
    assert (route, sp.kind, rerun.prompt_ids, rerun.output_offset, rerun.max_new_tokens) == (
        b"s0", "encode", (5, 6), 0, 5)
    co.members._dispatch(stage1, P.PassDone(worker_id="stage1", pass_id=sp.pass_id,
                                            stream=sp.stream, kind="encode",
                                            updates=(P.TokenUpdate("a", (7,)),)))
    assert not _chunks(co, clients)  # the replayed token is checked, not sent again
    co.schedule()
    [(_, dec)] = workers.take(P.StagePass)
    assert dec.kind == "decode" and dec.tokens == (7,)  # the replay's own last token
    co.members._dispatch(stage1, P.PassDone(worker_id="stage1", pass_id=dec.pass_id,
                                            stream=dec.stream, kind="decode",
                                            updates=(P.TokenUpdate("a", (8,)),)))
    assert _chunks(co, clients) == [(1, (8,))]
    assert co.table.get("a").tokens == [7, 8]


WAA_NAMES = ("enc0", "dec0", "dec1")


def _waa(tmp: Path) -> Coordinator:
    """A staged T5 WAA mesh: one encoder stage [0, 4) of the encoder stack, decoder stages
    [0, 2) and [2, 4) of the decoder stack; every stage READY."""
    cfg = CoordinatorConfig("ipc:///tmp/c", "ipc:///tmp/w", max_encode_batch=2, streams=1,
                            model_config=_t5_json(tmp), waa_encoder_layers="0:4",
                            waa_decoder_layers="0:2,2:4")
    co = Coordinator(cfg, Log())
    workers, clients = Sock(), Sock()
    co.client_endpoint = co.worker_endpoint = "ipc:///tmp/x"
    co.relay = Relay(clients, co.log, co.counters)  # type: ignore[arg-type]
    co.members = Membership(co, workers)  # type: ignore[arg-type]
    for s, name in enumerate(WAA_NAMES):
        co.members.on_hello(name.encode(), P.Hello(worker_id=name, role="pipeline",
                                                   capacity={"stage": s, "max_seqs": 8}))
    for name in WAA_NAMES:
        _ready(co, name, {})
    co.test_workers = workers  # type: ignore[attr-defined]
    return co


def _waa_plan(*groups: tuple[str, tuple[int, int], tuple[int, int] | None]) -> Plan:
    return _plan(tuple(WorkerGroup(role, 1, 1, dec, enc) for role, dec, enc in groups),
                 policy="waa-c")


def test_staged_t5_waa_split_is_accepted_and_re_assigned_with_cross_routes(
        tmp_path: Path) -> None:
    co = _waa(tmp_path)
    served = _waa_plan(("encoder", (0, 0), (0, 4)), ("decoder", (0, 2), None),
                       ("decoder", (2, 4), None))
    new = _waa_plan(("encoder", (0, 0), (0, 1)), ("encoder", (0, 0), (1, 4)),
                    ("decoder", (0, 4), None))
    layout, micro = relayout_target(co, served, new)  # type: ignore[misc]
    assert (layout.encoder, layout.decoder, layout.cross, micro) == (
        ((0, 1), (1, 4)), ((0, 4),), True, 1)
    both = _waa_plan(("encoder", (0, 2), (0, 4)), ("decoder", (0, 2), None),
                     ("decoder", (2, 4), None))
    assert "encoder layers only" in relayout_target(co, served, both)
    done: list[dict[str, Any]] = []
    co.pipeline.switch = WaaRelayout(co.pipeline, layout, 1, 1, done.append,
                                     RelayoutConfig(drain_timeout_s=0.0))
    co.schedule()
    workers: Sock = co.test_workers  # type: ignore[attr-defined]
    assigns = {a.worker_id: a for _, a in workers.take(P.Assign)}
    waa = {w: (a.layer_range, a.config["pipeline"]["waa"]["side"],
               a.config["pipeline"]["waa"]["routes"]) for w, a in assigns.items()}
    # only the last encoder stage hands on: the cross K/V of every decoder layer
    assert waa == {"enc0": ((0, 1), "encoder", []), "dec0": ((1, 4), "encoder", [["kv0", [0, 4]]]),
                   "dec1": ((0, 4), "decoder", [])}
    for name in WAA_NAMES:
        _ready(co, name, {"relayout": 1, "reload_s": 0.1})
    co.schedule()
    [cost] = done
    assert cost["ok"] and cost["stages"] == {"encoder": [[0, 1], [1, 4]], "decoder": [[0, 4]]}
