"""The coordinator side of pipeline plans (RRA, static, continuous) on stage workers.

    stage s --Hello(role="pipeline", capacity={"stage": s})--> coordinator
    stage s <--Assign(group=s, layer_range, encoder_layer_range,
                      config={"model", "pipeline": {"stage", "num_stages"}})--
    stage s --Ready(kv_endpoint)-->      ... every stage READY: stage s < P-1 gets an Assign
                                         refresh with peers {"next": stage s+1's kv_endpoint}
                                         (T5 over P > 1 stages: the last stage gets {"first":
                                         stage 0's}, where its encode passes start lap 1)

    schedule()      each idle stream (round robin) picks its next pass (coordinator.streams);
                    it goes to stage 0 as a StagePass and on through the stages by itself
    on_pass_done()  the last stage's PassDone: tokens relayed exactly like a WAA decoder's
                    (Coordinator.on_tokens), encode stamps, the stream becomes idle again

A request id is admitted only once no stream still holds it (running or waiting to be freed):
a client reusing a cancelled id cannot have its new request freed by the old one's ``free``.
A lost stage worker takes every request in the pipeline with it (WorkerLost) and empties the
streams; the ids go into the streams' next ``free`` for the stages that survive.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from common import protocol as P
from common.errors import BadRequest, InternalError, WorkerLost
from common.models.config import ModelConfig, stage_layer_ranges
from coordinator.config import CoordinatorConfig, parse_ranges
from coordinator.registry import WorkerInfo, WorkerState
from coordinator.requests import Request, State
from coordinator.streams import Pass, Stream, StreamKnobs

if TYPE_CHECKING:
    from coordinator.relayout import Relayout
    from coordinator.server import Coordinator

Range = tuple[int, int]


def hello_stage(msg: P.Hello, num_stages: int, kind: str) -> int:
    """The stage a Hello claims; ValueError (answered as bad_request) if it cannot be."""
    stage = msg.capacity.get("stage") if isinstance(msg.capacity, dict) else None
    if type(stage) is not int or not 0 <= stage < num_stages:
        raise ValueError(f"a {kind} worker's Hello.capacity needs an int stage in "
                         f"0..{num_stages - 1}, got {stage!r}")
    return stage


def stage_lead(co: Coordinator, stage: int) -> WorkerInfo | None:
    """The READY rank 0 of ``stage`` (it carries the stage's data)."""
    return next((w for w in co.members.ready("pipeline") if w.stage == stage), None)


def all_stages_ready(co: Coordinator, num_stages: int) -> bool:
    """Every stage has its rank 0 and all its TP ranks READY."""
    workers = [w for w in co.members.registry
               if w.role == "pipeline" and w.state is WorkerState.READY]
    for s in range(num_stages):
        lead = stage_lead(co, s)
        if lead is None or sum(w.stage == s for w in workers) < lead.tp_size:
            return False
    return True


@dataclass(frozen=True)
class StageLayout:
    """Each stage's decoder layers (and T5 encoder layers), [lo, hi), in pipeline order."""

    layers: tuple[Range, ...]
    encoder_layers: tuple[Range, ...] | None = None

    @property
    def num_stages(self) -> int:
        return len(self.layers)


def _check_cover(ranges: tuple[Range, ...], total: int, what: str) -> None:
    lo = 0
    for first, end in ranges:
        if first != lo or end <= first:
            raise ValueError(f"{what} {list(ranges)} must be non-empty, contiguous ranges "
                             f"covering layers 0..{total}")
        lo = end
    if lo != total:
        raise ValueError(f"{what} {list(ranges)} cover layers 0..{lo}; the model has {total}")


def stage_layout(cfg: CoordinatorConfig, model: ModelConfig) -> StageLayout:
    """The flags' ranges (or an even split), checked against the served model."""
    num = cfg.pipeline_stages
    layers = (parse_ranges(cfg.stage_layers, "stage_layers")
              or tuple(stage_layer_ranges(model.num_layers, num)))
    _check_cover(layers, model.num_layers, "stage_layers")
    if model.num_encoder_layers == 0:
        if cfg.stage_encoder_layers is not None:
            raise ValueError(f"{model.name} has no encoder: drop --stage-encoder-layers")
        return StageLayout(layers)
    enc = (parse_ranges(cfg.stage_encoder_layers, "stage_encoder_layers")
           or tuple(stage_layer_ranges(model.num_encoder_layers, num)))
    _check_cover(enc, model.num_encoder_layers, "stage_encoder_layers")
    return StageLayout(layers, enc)


class PipelineDriver:
    """Streams, passes in flight and the stage workers of one pipeline plan."""

    def __init__(self, co: Coordinator) -> None:
        self.co = co
        self.layout = stage_layout(co.cfg, co.model)
        knobs = StreamKnobs(co.cfg.policy, co.cfg.max_encode_batch, co.cfg.n_d)
        self.streams = [Stream(i, knobs) for i in range(co.cfg.streams
                                                         or self.layout.num_stages)]
        self._inflight: dict[int, tuple[Stream, Pass]] = {}
        # random start: a restarted coordinator's pass ids never meet a stale PassDone's
        self._pass_id = secrets.randbits(40)
        self._next_stream = 0
        self._cycles = [0] * len(self.streams)  # rra: cycles each stream has started
        self.counters = {"encode_passes": 0, "decode_passes": 0, "free_passes": 0,
                         "failed_passes": 0}
        self.switch: Relayout | None = None  # a live re-layout in progress (coordinator.relayout)

    # ---- re-layout (coordinator.relayout drives these) -------------------------------------
    @property
    def switching(self) -> bool:
        return self.switch is not None

    def install(self, layout: StageLayout, streams: list[Stream]) -> None:
        """The new layout and streams (no pass in flight, no request on any stream)."""
        self.layout, self.streams = layout, streams
        self._inflight.clear()
        self._next_stream = 0
        self._cycles = [0] * len(streams)

    def relayout_assign(self, info: WorkerInfo, epoch: int) -> P.Assign:
        """A re-Assign to the worker's new stage (``info.stage``), or to none (a spare)."""
        if info.stage is None:
            return P.Assign(worker_id=info.worker_id, role="pipeline", group=-1,
                            tp_rank=info.tp_rank, tp_size=info.tp_size,
                            heartbeat_interval_s=self.co.cfg.heartbeat_interval_s,
                            config={"model": self.co.model.to_dict(), "pipeline": None,
                                    "relayout": epoch,
                                    "instance": getattr(self.co, "instance", None)})
        assign = self.co.members._assign(info)  # noqa: SLF001 - the same Assign a Hello gets
        return dataclasses.replace(assign, config={**assign.config, "relayout": epoch})

    # ---- stage workers --------------------------------------------------------------------
    def stage_of(self, msg: P.Hello) -> int:
        return hello_stage(msg, self.layout.num_stages, "pipeline")

    def assign(self, info: WorkerInfo) -> P.Assign:
        if info.stage is None and getattr(self.co, "resumed", None):  # a spare rejoining after a
            return self.relayout_assign(info, 0)  # restart (coordinator.layout_state)
        s = info.stage if info.stage is not None else 0
        enc = self.layout.encoder_layers[s] if self.layout.encoder_layers else None
        return P.Assign(worker_id=info.worker_id, role="pipeline", group=s,
                        tp_rank=info.tp_rank, tp_size=info.tp_size,
                        layer_range=self.layout.layers[s], encoder_layer_range=enc,
                        peers=self._peers(s), heartbeat_interval_s=self.co.cfg.heartbeat_interval_s,
                        config={"model": self.co.model.to_dict(),
                                "pipeline": {"stage": s, "num_stages": self.layout.num_stages},
                                # --adapt may re-lay the stages out: keep the weights in host
                                # memory for it (common.weightstore)
                                "host_weights": bool(self.co.cfg.adapt)})

    @property
    def _laps(self) -> bool:
        """T5 over several stages: encodes take two laps (the last stage sends to stage 0)."""
        return self.layout.encoder_layers is not None and self.layout.num_stages > 1

    def _peers(self, stage: int) -> dict[str, str]:
        if stage + 1 < self.layout.num_stages:
            name, peer = "next", self._lead(stage + 1)
        elif self._laps:
            name, peer = "first", self._lead(0)
        else:
            return {}
        return {name: peer.kv_endpoint} if peer is not None and peer.kv_endpoint else {}

    def _lead(self, stage: int) -> WorkerInfo | None:
        return stage_lead(self.co, stage)

    def stages_ready(self) -> bool:
        return all_stages_ready(self.co, self.layout.num_stages)

    def on_stage_ready(self, worker: WorkerInfo | None = None,
                       info: dict[str, Any] | None = None) -> None:
        """Once all stages are READY (again), tell each stage where the next one listens."""
        if self.switch is not None and worker is not None:
            self.switch.on_ready(worker, info if isinstance(info, dict) else {})
        if not self.stages_ready():
            return
        for s in range(self.layout.num_stages - (0 if self._laps else 1)):
            lead = self._lead(s)
            if lead is not None:
                self.co.members.send(lead, self.assign(lead))

    def on_stage_lost(self, worker_id: str, why: str) -> None:
        """Every request in the pipeline fails; the survivors free them on the next pass."""
        if self.switch is not None:
            self.switch.lost(worker_id)
        self._inflight.clear()
        self._cycles = [0] * len(self.streams)
        for stream in self.streams:
            for req_id in stream.reset():
                request = self.co.table.get(req_id)
                if request is not None:
                    self.co.fail(request, WorkerLost(
                        f"pipeline stage worker {worker_id} was lost ({why})", req_id=req_id))

    # ---- passes ---------------------------------------------------------------------------
    def schedule(self) -> None:
        """Send each idle stream's next pass (round robin over streams)."""
        if self.switch is not None:
            self.switch.step()
            if self.switch is not None and not self.switch.passes_allowed:
                return
        if not self.co.members.serving or not self.stages_ready():
            return
        stage0 = self._lead(0)
        assert stage0 is not None
        n = len(self.streams)
        start = self._next_stream  # fixed for this sweep: every stream is considered once
        for k in range(n):
            stream = self.streams[(start + k) % n]
            if stream.busy is not None:
                continue
            self._sync(stream)
            queued = self._queued()
            if self._held_back(stream, queued):
                continue
            boundary = stream.knobs.policy == "rra" and not stream.mid_cycle
            chosen = stream.next_pass(queued)
            if chosen is not None:
                if boundary and chosen.req_ids:
                    self._cycles[stream.index] += 1
                self._send(stream, chosen, stage0)
                self._next_stream = (stream.index + 1) % n

    def _held_back(self, stream: Stream, queued: list[str]) -> bool:
        """rra lock step: a stream at a cycle boundary with requests to encode waits while
        another stream is still inside the cycle of the same number. The simulator runs the
        streams' cycles side by side (their encodes in one pipelined round); streams left to
        drift apart put one stream's long encode in front of the other's decode passes on
        every stage in turn, idling each stage for about one encode (-30% throughput measured
        on SmolLM2, docs/results.md)."""
        if stream.knobs.policy != "rra" or stream.mid_cycle or not queued:
            return False
        mine = self._cycles[stream.index]
        return any(other.mid_cycle and self._cycles[other.index] == mine
                   for other in self.streams if other is not stream)

    def _sync(self, stream: Stream) -> None:
        """Requests the coordinator answered meanwhile (finished, cancelled, timed out) leave
        the stream; one without a first token (a stage broke the contract) fails."""
        for req_id in list(stream.running):
            request = self.co.table.get(req_id)
            if request is not None and request.last_token is None:
                self.co.fail(request, InternalError("the pipeline returned no first token for "
                                                    "this request", req_id=req_id))
                request = None
            if request is None:
                stream.release(req_id)

    def _queued(self) -> list[str]:
        if self.switch is not None:
            return []  # re-laying out: arrivals wait in the queue
        held = {r for s in self.streams for r in (*s.running, *s.pending_free)}
        batch = self.co.cfg.max_encode_batch
        ids = [r.req_id for r in self.co.table.peek_queued(batch + len(held))]
        return [r for r in ids if r not in held][:batch]

    def _send(self, stream: Stream, chosen: Pass, stage0: WorkerInfo) -> None:
        self._pass_id += 1
        table = self.co.table
        if chosen.kind == "encode":
            now = time.time()
            items = []
            for req_id in chosen.req_ids:
                request = table.get(req_id)
                assert request is not None
                table.dequeue(request)
                request.state = State.ENCODING
                request.times.t_encode_start = now
                items.append(_encode_request(request))
            msg = P.StagePass(pass_id=self._pass_id, stream=stream.index, kind="encode",
                              req_ids=chosen.req_ids, requests=tuple(items), free=chosen.free)
        else:
            tokens = tuple(_last_token(table.get(r)) for r in chosen.req_ids)
            msg = P.StagePass(pass_id=self._pass_id, stream=stream.index, kind="decode",
                              req_ids=chosen.req_ids, tokens=tokens, free=chosen.free)
        kind = "free" if not chosen.req_ids else chosen.kind
        self.counters[f"{kind}_passes"] += 1
        self._inflight[self._pass_id] = (stream, chosen)
        self.co.members.send(stage0, msg)

    def on_pass_done(self, worker: WorkerInfo, msg: P.PassDone) -> None:
        entry = self._inflight.pop(msg.pass_id, None)
        if entry is None or entry[0].index != msg.stream:
            self.co.log.warning("stale_pass_done", worker=worker.worker_id, pass_id=msg.pass_id,
                                stream=msg.stream)
            return
        stream, sent = entry
        now = time.time()
        if msg.error is not None:
            self._pass_failed(stream, sent, worker, msg)
            return
        if sent.kind == "encode":
            for req_id in sent.req_ids:
                request = self.co.table.get(req_id)
                if request is not None:
                    request.times.t_encode_end = now
        finished = []
        for update in msg.updates:
            if update.req_id in stream.running:
                self.co.on_tokens(update, now)
                if update.finished:
                    finished.append(update.req_id)
        stream.done(finished)
        if sent.req_ids:  # a free-only pass computed nothing: not a batch for the stats
            self.co.metrics.on_pass(stream.index, sent.kind, len(sent.req_ids), msg.stage_times)

    def _pass_failed(self, stream: Stream, sent: Pass, worker: WorkerInfo,
                     msg: P.PassDone) -> None:
        self.counters["failed_passes"] += 1
        self.co.log.warning("pass_failed", worker=worker.worker_id, pass_id=msg.pass_id,
                            kind=sent.kind, requests=len(sent.req_ids), error=msg.error)
        stream.failed()
        # a stage refuses an encode pass for its input; a decode pass fails for the server's
        error = BadRequest if sent.kind == "encode" else InternalError
        for req_id in sent.req_ids:
            request = self.co.table.get(req_id)
            if request is not None:
                self.co.fail(request, error(
                    f"pipeline stage {msg.worker_id} failed the {sent.kind} pass of "
                    f"{len(sent.req_ids)} request(s): {msg.error}", req_id=req_id))

    def describe(self) -> dict[str, Any]:
        """B and N_D are the live knobs (--adapt may have switched them since launch; every
        stream gets the same), ``launch`` the flags the coordinator started with."""
        live = self.streams[0].knobs if self.streams else None
        return {"policy": self.co.cfg.policy,
                "B": live.batch if live else self.co.cfg.max_encode_batch,
                "N_D": live.n_d if live else self.co.cfg.n_d,
                "launch": {"B": self.co.cfg.max_encode_batch, "N_D": self.co.cfg.n_d},
                "stages": [list(r) for r in self.layout.layers],
                "relayout": self.switch.describe() if self.switch is not None else None,
                "streams": [{"running": len(s.running), "busy": s.busy is not None,
                             "B": s.knobs.batch, "N_D": s.knobs.n_d}
                            for s in self.streams], **self.counters}


def _encode_request(request: Request) -> P.EncodeRequest:
    """A request migrated by a re-layout is re-encoded from its prompt plus the tokens the
    client has (``output_offset`` of them), for the tokens still owed."""
    prompt, max_new, offset = request.rerun_input()
    return P.EncodeRequest(req_id=request.req_id, prompt_ids=prompt, max_new_tokens=max_new,
                           sampling=request.sampling, output_offset=offset,
                           lifecycle=P.Lifecycle(t_arrival=request.times.t_arrival,
                                                 t_queued=request.times.t_queued))


def _last_token(request: Request | None) -> int:
    """The current run's latest token (a replaying T5 re-run's is not ``tokens[-1]``)."""
    token = request.last_token if request is not None else None
    assert token is not None  # _sync dropped every other case
    return token
