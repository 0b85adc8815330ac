"""A pipeline stage worker's compute loop (RRA, static and continuous plans).

    coordinator --StagePass--> stage 0 --StagePass(+hidden)--> stage 1 ... --> last stage
    last stage --PassDone(one TokenUpdate per request, stage_times)--> coordinator

    loop:
        take a message     StagePass (from the coordinator on stage 0, from the previous
                           stage's DEALER on the others), Shutdown / Stop -> finish
        run_pass(pass)     backend.run: free ``free``, run ``kind`` over ``req_ids``
        hand on            not last: the same pass with ``hidden`` = our rows, our compute time
                           appended to ``stage_times``, to peer "next"; last: PassDone
                           (T5 over several stages: the last stage ends an encode's lap 0 by
                           sending it to peer "first" = stage 0 as lap 1 with ``encoder_out``)

Passes are taken FIFO from every stream; a stage holds the KV of every running request of
every stream. A pass that fails (bad input: ValueError) drops its requests here and sends
``PassDone(error=...)`` to the coordinator, which lists the pass's requests and ``free`` in
the stream's next ``free`` (the stages before this one still hold them, those after it never
saw the pass). ``Cancel`` needs no work here: a cancelled request reaches every stage in a
pass's ``free``. When no pass waits the loop blocks on the inbox, so an idle stage costs no CPU.
"""

from __future__ import annotations

import dataclasses
import queue
import time
from typing import Any

from common import protocol as P
from common.backend_stage import NullStageBackend, PassOutput, StageBackendBase
from common.busyclock import BusyClock
from common.models.config import ModelConfig
from common.workerconfig import WorkerConfig
from common.workerlink import Rejoin, Stop, WorkerLink
from common.workermain import check_same_model, stop_code

NEXT = "next"  # the Assign peer naming the next stage's KV endpoint
FIRST = "first"  # T5 over several stages: the last stage's peer for lap 1 (stage 0)


def pipeline_place(cfg: WorkerConfig, assign: P.Assign) -> tuple[int, int]:
    """(stage, num_stages) from the Assign, which must agree with this worker's --stage."""
    place = assign.config.get("pipeline")
    if not isinstance(place, dict) or not {"stage", "num_stages"} <= set(place):
        raise ValueError('the coordinator\'s Assign lacks config["pipeline"] = {"stage", '
                         '"num_stages"}; is it serving a pipeline plan (rra, static, continuous)?')
    stage, num_stages = int(place["stage"]), int(place["num_stages"])
    moved = "relayout" in assign.config  # a live re-layout may give this worker another stage
    if not 0 <= stage < num_stages or (stage != cfg.stage and not moved):
        raise ValueError(f"this worker is stage {cfg.stage} but the coordinator assigned stage "
                         f"{stage} of {num_stages}")
    return stage, num_stages


def build_stage_backend(cfg: WorkerConfig, assign: P.Assign) -> StageBackendBase:
    """The backend of this stage: the engine over the Assign's layer ranges, or the null model."""
    stage, num_stages = pipeline_place(cfg, assign)
    first, last = stage == 0, stage == num_stages - 1
    if cfg.backend == "null":
        model = ModelConfig.from_dict(assign.config["model"])
        null = NullStageBackend(model, first, last, cfg.encode_cost_ms,
                                cfg.encode_cost_ms_per_token, cfg.decode_cost_ms)
        null.stage_index = stage
        return null
    from common.backend_engine import load_spec

    assert cfg.model is not None
    if cfg.tp_size == 1 and assign.config.get("host_weights"):
        # an adapting coordinator may re-lay out: keep the model in host memory to rebuild from
        from common.weightstore import spec_from_host

        spec = spec_from_host(cfg.model)[0]
    else:
        spec = load_spec(cfg.model)
    check_same_model(spec.config, assign)
    layers = _range(assign.layer_range)
    enc = _range(assign.encoder_layer_range)
    onward = stage + 2 < num_stages  # T5 lap 1: the next stage is not the last
    if cfg.tp_size == 1:
        from common.backend_stage_engine import EngineStageBackend

        backend: StageBackendBase = EngineStageBackend(spec, layers, enc, cfg.dtype, cfg.device,
                                                       encoder_out_onward=onward)
    else:
        from common.backend_engine_tp import init_tp_group
        from common.backend_stage_tp import TPStageBackend

        assert cfg.tp_init is not None
        tp = init_tp_group(cfg.tp_init, cfg.tp_rank, cfg.tp_size, cfg.heartbeat_timeout_s * 4)
        backend = TPStageBackend(spec, tp, layers, enc, cfg.dtype, cfg.device,
                                 encoder_out_onward=onward)
    if (backend.is_first, backend.is_last) != (first, last):
        raise ValueError(f"stage {stage} of {num_stages} got layer_range {assign.layer_range}, "
                         f"which {'does not start' if first else 'starts'} at layer 0 or "
                         f"{'does not end' if last else 'ends'} at the model's last layer")
    backend.stage_index = stage
    return backend


def _range(rng: tuple[int, ...] | None) -> tuple[int, int] | None:
    return None if rng is None else (int(rng[0]), int(rng[1]))


def _add_time(sp: P.StagePass, stage: int | None, spent: float) -> tuple[float, ...]:
    """``stage_times`` with this stage's compute: appended (lap 0), or added to this stage's
    entry on a T5 encode's lap 1, so PassDone keeps one entry per stage."""
    times = sp.stage_times
    if sp.lap == 1 and stage is not None and stage < len(times):
        return times[:stage] + (times[stage] + spent,) + times[stage + 1:]
    return times + (spent,)


class StageLoop:
    """Owns this stage's passes; talks to the world only through the link."""

    def __init__(self, cfg: WorkerConfig, link: WorkerLink, backend: StageBackendBase,
                 log: Any) -> None:
        self.cfg, self.link, self.backend, self.log = cfg, link, backend, log
        self.passes = 0
        self.failed_passes = 0
        self.tokens_out = 0
        self.busy = BusyClock()
        self.exit_code: int | None = None
        self.switch_to: P.Assign | None = None  # a TP re-group (decoder_worker.regroup)
        link.load = self.load

    def load(self) -> dict[str, Any]:
        return {"active": self.backend.num_active, "passes": self.passes,
                "failed_passes": self.failed_passes, "tokens_out": self.tokens_out,
                **self.busy.load(), "queued_messages": self.link.inbox.qsize()}

    def run(self) -> int:
        try:
            while self.exit_code is None:
                msg = self.next_message()
                if msg is not None:
                    self.handle(msg)
            return self.exit_code
        finally:
            self.backend.close()

    def next_message(self) -> P.Message | Stop | None:
        """The next message to handle; None after an idle second (the keep-alive ran)."""
        try:
            return self.link.inbox.get(timeout=1.0)
        except queue.Empty:
            self.backend.idle()  # a TP group's keep-alive
            return None

    def handle(self, msg: P.Message | Stop) -> None:
        if isinstance(msg, P.StagePass):
            self.run_pass(msg)
        elif isinstance(msg, P.Assign) and (msg.config.get("tp") or {}).get("keep"):
            from decoder_worker.regroup import keep_stage  # a kept TP group: no re-group

            keep_stage(self, msg)
        elif isinstance(msg, P.Assign) and "tp" in msg.config:  # a TP re-group: this loop
            leave = getattr(self.backend, "leave_group", None)  # ends, run_worker regroups
            if leave is not None:
                leave()  # this TP stage's followers leave the gloo group with it, here
            self.switch_to, self.exit_code = msg, 0
        elif isinstance(msg, P.Assign):
            self.relayout(msg)
        elif isinstance(msg, P.Cancel):
            self.log.debug("cancel_noted", req_id=msg.req_id)  # freed via a pass's `free`
        elif isinstance(msg, Rejoin):  # the coordinator restarted: it knows none of these
            self.log.warning("dropping_all", reason=msg.reason, sequences=len(self.backend.seqs))
            self.backend.drop(list(self.backend.seqs))
        elif (code := stop_code(msg, self.log)) is not None:
            self.exit_code = code
        else:
            self.link.limited.warning("unexpected_message", type=type(msg).__name__)

    def relayout(self, assign: P.Assign) -> None:
        """A re-Assign with another stage / layer range (coordinator.relayout): the old
        backend goes (its KV with it: the coordinator drained or migrated every request
        first), the new one is built from the host-memory weights, and Ready goes out again
        with the rebuild time. A worker the new layout does not use ("spare") holds nothing."""
        epoch = assign.config.get("relayout")
        start = time.perf_counter()
        self.backend.close()
        model = ModelConfig.from_dict(assign.config["model"])
        self.backend = NullStageBackend(model, False, False)  # holds nothing meanwhile
        try:
            if assign.config.get("pipeline") is not None:
                if self.cfg.tp_size != 1:
                    raise ValueError("a TP stage group cannot be re-laid out live")
                self.backend = build_stage_backend(self.cfg, assign)
        except (ValueError, OSError) as exc:
            self.log.error("relayout_failed", epoch=epoch, error=str(exc))
            self.link.send(P.Error(code="internal", message=f"re-layout {epoch} failed on "
                                   f"{self.cfg.worker_id}: {exc}"))
            return
        seconds = time.perf_counter() - start
        self.log.info("relayout", epoch=epoch, layer_range=assign.layer_range,
                      spare=assign.config.get("pipeline") is None, reload_s=round(seconds, 4))
        self.link.ready({"relayout": epoch, "reload_s": round(seconds, 4),
                         "backend": self.cfg.backend})

    def run_pass(self, sp: P.StagePass) -> None:
        start = time.perf_counter()
        try:
            with self.busy.timing():
                out = self.backend.run(sp)
        except ValueError as exc:
            self.fail(sp, str(exc))
            return
        spent = time.perf_counter() - start
        self.passes += 1
        self.hand_on(sp, out, _add_time(sp, self.backend.stage_index, spent))

    def hand_on(self, sp: P.StagePass, out: PassOutput, times: tuple[float, ...]) -> None:
        if out.lap_back:  # T5: the encoder output goes back to stage 0 for lap 1
            self.link.send(dataclasses.replace(sp, lap=1, hidden=None,
                                               encoder_out=out.encoder_out, stage_times=times),
                           decoder_id=FIRST)
            return
        if not self.backend.is_last:
            self.link.send(dataclasses.replace(sp, hidden=out.hidden, stage_times=times,
                                               encoder_out=out.encoder_out), decoder_id=NEXT)
            return
        updates = tuple(P.TokenUpdate(req_id=t.req_id, tokens=(t.token,), finished=t.finished,
                                      finish_reason=t.reason) for t in out.tokens)
        self.tokens_out += len(updates)
        self.link.send(P.PassDone(worker_id=self.cfg.worker_id, pass_id=sp.pass_id,
                                  stream=sp.stream, kind=sp.kind, updates=updates,
                                  stage_times=times))

    def fail(self, sp: P.StagePass, error: str) -> None:
        """The pass's requests are gone here; the coordinator frees them everywhere else."""
        self.failed_passes += 1
        self.link.limited.error("pass_failed", pass_id=sp.pass_id, stream=sp.stream, kind=sp.kind,
                       error=error)
        self.link.send(P.PassDone(worker_id=self.cfg.worker_id, pass_id=sp.pass_id,
                                  stream=sp.stream, kind=sp.kind, error=error,
                                  stage_times=sp.stage_times))
