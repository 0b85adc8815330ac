"""The coordinator side of WAA plans whose groups hold layer ranges: an encoder pipeline and a
decoder pipeline of stage workers, KV straight from each encoder stage to the decoder stages
holding its layers, and B_m decode micro-batches in flight.

    encoder stages  global stages 0..E-1      decoder stages  global stages E..E+D-1
    (``python -m decoder_worker --role pipeline --stage S``; the Assign's
    config["pipeline"]["waa"] tells a stage its side, see decoder_worker/waa_stage.py)

    queued --encode StagePass (B_E, sized by the BatchSizer)--> enc 0 --hidden--> ... enc E-1
           enc s --KVHandoff(its layers, per decoder stage overlapping them)--> dec k
           enc E-1 --PassDone(first tokens)--> coordinator: each request joins a micro-batch
           (T5: enc E-1 alone hands on KV, no first token: coordinator/waa_layout.py)
    micro-batch m --decode StagePass(req_ids, last tokens, free)--> dec 0 --hidden--> ... dec D-1
           dec D-1 --PassDone(one token each)--> coordinator: relayed; micro-batch m's next
                                                  iteration starts (new arrivals merged in)

The coordinator drives both pipelines, as pipeline_driver does for RRA: up to E encode passes
in flight, one decode pass per micro-batch. A request finished at its first token, cancelled,
failed or timed out leaves through a micro-batch's next ``free`` (decoder stages drop its KV,
and remember the id so a late KVHandoff is dropped too). A lost encoder stage fails the
requests being encoded (decoding ones carry on); a lost decoder stage fails every request the
decoder side holds; no other pipeline exists to re-run them on (WorkerLost, as today's WAA
when no worker of the role remains), and until the stage is back new requests are refused.

Live re-layout (``switch``, coordinator.relayout.WaaRelayout, started by the adapter): a new
plan with another encoder/decoder split or other stage ranges on the same tp-1 workers, or
other tp_size per stage (the workers re-grouped: coordinator.relayout_tp.WaaTpRelayout); the
driver then stops encoding, drains or migrates, and ``install``s the new layout's tables.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from common import protocol as P
from common.errors import BadRequest, InternalError, WorkerLost
from coordinator.pipeline_driver import all_stages_ready, hello_stage, stage_lead
from coordinator.registry import WorkerInfo
from coordinator.requests import Request, State
from coordinator.waa_layout import waa_layout

if TYPE_CHECKING:
    from coordinator.relayout import WaaRelayout
    from coordinator.server import Coordinator

ENCODE_STREAM = 0  # the encode passes' ``stream`` (encoder stages keep no request across passes)


@dataclass
class MicroBatch:
    """One decode micro-batch: at most one pass in flight; arrivals join at its next pass."""

    index: int
    running: list[str] = field(default_factory=list)  # wire ids, in pass order
    joining: list[str] = field(default_factory=list)
    free: list[str] = field(default_factory=list)  # for the decoder stages' next pass
    busy: int | None = None  # the pass in flight

    @property
    def size(self) -> int:
        return len(self.running) + len(self.joining)


class WaaPipelineDriver:
    """Both pipelines of one staged WAA plan; plugs into the coordinator like PipelineDriver."""

    def __init__(self, co: Coordinator) -> None:
        self.co = co
        self.layout = waa_layout(co.cfg, co.model)
        self.micro = [MicroBatch(i) for i in range(max(1, co.cfg.streams))]
        self.streams: list[Any] = []  # no RRA-style streams: the adapter's knobs are B_E only
        self._encoding: dict[int, tuple[str, ...]] = {}  # encode pass id -> wire ids
        self._pass_id = 0
        self._stage_by_id: dict[str, int] = {}
        self.counters = {"encode_passes": 0, "decode_passes": 0, "free_passes": 0,
                         "failed_passes": 0}
        self.switch: WaaRelayout | None = None  # a live re-layout in progress

    # ---- re-layout (coordinator.relayout.WaaRelayout drives these) -------------------------
    @property
    def switching(self) -> bool:
        return self.switch is not None

    def install(self, layout: Any, num_micro: int, stale: list[str]) -> None:
        """The new layout and micro-batches (no pass in flight, no request held). ``stale``:
        migrated requests' old wire ids, freed in the new decoder stages' first passes (a
        late KVHandoff of the old run is then dropped there, not kept pending)."""
        self.layout = layout
        self._encoding.clear()
        self.micro = [MicroBatch(i) for i in range(max(1, num_micro))]
        for wire_id in stale:
            self._free_later(wire_id)

    def relayout_assign(self, info: WorkerInfo, epoch: int) -> P.Assign:
        """A re-Assign to the worker's new stage (``info.stage``): the worker swaps its loop."""
        assign = self.assign(info)
        return dataclasses.replace(assign, config={**assign.config, "relayout": epoch})

    # ---- stage workers --------------------------------------------------------------------
    def stage_of(self, msg: P.Hello) -> int:
        return hello_stage(msg, self.layout.num_stages, "staged WAA")

    def assign(self, info: WorkerInfo) -> P.Assign:
        s = info.stage if info.stage is not None else 0
        self._stage_by_id[info.worker_id] = s
        side, index = self.layout.side(s)
        ranges = self.layout.encoder if side == "encoder" else self.layout.decoder
        peers: dict[str, str] = {}
        nxt = self._lead(s + 1) if index + 1 < len(ranges) else None
        if nxt is not None and nxt.kv_endpoint:
            peers["next"] = nxt.kv_endpoint
        routes = self.layout.routes(index) if side == "encoder" else []
        for k, _ in routes:
            dest = self._lead(len(self.layout.encoder) + k)
            if dest is not None and dest.kv_endpoint:
                peers[f"kv{k}"] = dest.kv_endpoint
        waa = {"side": side, "index": index, "count": len(ranges),
               "routes": [[f"kv{k}", list(rng)] for k, rng in routes]}
        return P.Assign(worker_id=info.worker_id, role="pipeline", group=s,
                        tp_rank=info.tp_rank, tp_size=info.tp_size, layer_range=ranges[index],
                        peers=peers, heartbeat_interval_s=self.co.cfg.heartbeat_interval_s,
                        config={"model": self.co.model.to_dict(),
                                "pipeline": {"stage": s, "num_stages": self.layout.num_stages,
                                             "waa": waa},
                                # --adapt may re-lay the stages out: weights in host memory
                                "host_weights": bool(self.co.cfg.adapt)})

    def _lead(self, stage: int) -> WorkerInfo | None:
        return stage_lead(self.co, stage)

    def stages_ready(self) -> bool:
        return all_stages_ready(self.co, self.layout.num_stages)

    def on_stage_ready(self, worker: WorkerInfo | None = None,
                       info: dict[str, Any] | None = None) -> None:
        """Once every stage is READY (again), each learns its next stage and KV routes."""
        if self.switch is not None and worker is not None:
            self.switch.on_ready(worker, info if isinstance(info, dict) else {})
            return  # the switch's end refreshes every stage's peers
        if not self.stages_ready():
            return
        for s in range(self.layout.num_stages):
            lead = self._lead(s)
            if lead is not None:
                self.co.members.send(lead, self.assign(lead))

    def on_stage_lost(self, worker_id: str, why: str) -> None:
        if self.switch is not None:
            self.switch.lost(worker_id)
        side, _ = self.layout.side(self._stage_of_id(worker_id))
        lost = [r for ids in self._encoding.values() for r in ids]
        self._encoding.clear()
        if side == "decoder":
            for mb in self.micro:
                lost += mb.running + mb.joining
                mb.running, mb.joining, mb.busy = [], [], None
        for wire_id in lost:
            self._free_later(wire_id)
            request = self.co.table.get_wire(wire_id)
            if request is not None:
                self.co.fail(request, WorkerLost(
                    f"{side} stage worker {worker_id} was lost ({why}); no other {side} "
                    "pipeline remains to re-run it", req_id=request.req_id))

    def _stage_of_id(self, worker_id: str) -> int:
        """The lost worker's stage (it left the registry already: remembered at Assign)."""
        return self._stage_by_id.get(worker_id, 0)

    # ---- encode passes --------------------------------------------------------------------
    def schedule(self) -> None:
        if self.switch is not None:
            self.switch.step()
            if self.switch is not None and not self.switch.passes_allowed:
                return
        if not self.co.members.serving or not self.stages_ready():
            return
        self._schedule_decodes()
        while self.switch is None and self._schedule_encode():  # re-laying out: none admitted
            pass

    def _held(self) -> set[str]:
        held = {r for ids in self._encoding.values() for r in ids}
        for mb in self.micro:
            held.update(mb.running, mb.joining, mb.free)
        return held

    def _capacity(self) -> int:
        """What the decoder side may hold at once: its stages' smallest max_seqs."""
        e = len(self.layout.encoder)
        leads = [self._lead(e + k) for k in range(len(self.layout.decoder))]
        return min(w.capacity for w in leads if w is not None)

    def _schedule_encode(self) -> bool:
        """One encode pass of about B_E queued requests, if the encoder pipeline has room."""
        co = self.co
        if not co.table.num_queued or len(self._encoding) >= len(self.layout.encoder):
            return False
        held = self._held()
        room = self._capacity() - len(held)
        if room <= 0:
            return False
        queued = [r for r in co.table.peek_queued(2 * co.sizer.plan_batch + len(held))
                  if r.wire_id not in held][:min(2 * co.sizer.plan_batch, room)]
        if not queued:
            return False
        running = sum(mb.size for mb in self.micro)
        decision = co.sizer.size([r.num_prompt_tokens for r in queued], running)
        batch = queued[:max(1, min(decision.size, room))]
        tokens = sum(r.num_prompt_tokens for r in batch)
        if decision.reason != "plan":
            co.counters["be_adjustments"] += 1
            co.log.info("be_adjusted", size=len(batch), plan_B_E=co.sizer.plan_batch,
                        running=running, reason=decision.reason, token_sum=tokens)
        stage0 = self._lead(0)
        assert stage0 is not None
        co.metrics.on_encode_batch(stage0.worker_id, len(batch), tokens,
                                   decision.reason != "plan", decision.reason)
        self._send_encode(batch, stage0)
        return True

    def _send_encode(self, batch: list[Request], stage0: WorkerInfo) -> None:
        self._pass_id += 1
        now = time.time()
        items = []
        for request in batch:
            self.co.table.dequeue(request)
            request.state = State.ENCODING
            request.times.t_encode_start = now
            prompt, max_new, offset = request.rerun_input()
            items.append(P.EncodeRequest(
                req_id=request.wire_id, prompt_ids=prompt, max_new_tokens=max_new,
                sampling=request.sampling, output_offset=offset,
                lifecycle=P.Lifecycle(t_arrival=request.times.t_arrival,
                                      t_queued=request.times.t_queued)))
        ids = tuple(item.req_id for item in items)
        self._encoding[self._pass_id] = ids
        self.counters["encode_passes"] += 1
        self.co.members.send(stage0, P.StagePass(pass_id=self._pass_id, stream=ENCODE_STREAM,
                                                 kind="encode", req_ids=ids,
                                                 requests=tuple(items)))

    def _encode_done(self, ids: tuple[str, ...], msg: P.PassDone, now: float) -> None:
        """First tokens (T5: none, the lifecycle only): relay them; requests still running join
        the emptiest micro-batch."""
        got = {u.req_id: u for u in msg.updates}
        for wire_id in ids:
            request = self.co.table.get_wire(wire_id)
            update = got.get(wire_id)
            if request is not None:
                request.times.t_encode_end = now
                if update is None:
                    self.co.fail(request, InternalError("the encoder pipeline returned no "
                                                        "first token", req_id=request.req_id))
                else:
                    self.co.on_tokens(update, now)
            if request is None or request.state is State.DONE or update is None:
                self._free_later(wire_id)
            else:
                min(self.micro, key=lambda m: m.size).joining.append(wire_id)

    # ---- decode passes --------------------------------------------------------------------
    def _schedule_decodes(self) -> None:
        stage0 = self._lead(len(self.layout.encoder))
        assert stage0 is not None
        for mb in self.micro:
            if mb.busy is not None:
                continue
            self._sync(mb)
            mb.running += mb.joining
            mb.joining = []
            if not mb.running and not mb.free:
                continue
            self._pass_id += 1
            ids = tuple(mb.running)
            tokens = tuple(self._last_token(r) for r in ids)
            msg = P.StagePass(pass_id=self._pass_id, stream=mb.index, kind="decode",
                              req_ids=ids, tokens=tokens, free=tuple(mb.free))
            mb.free, mb.busy = [], self._pass_id
            self.counters["decode_passes" if ids else "free_passes"] += 1
            self.co.members.send(stage0, msg)

    def _last_token(self, wire_id: str) -> int:
        """What the request's next decode step feeds: its last token, or (T5, before the
        decoder pipeline sampled the first one) the decoder start token."""
        request = self.co.table.get_wire(wire_id)
        assert request is not None  # _sync dropped the gone ones just before
        token = request.last_token  # the current run's (a replaying re-run: not tokens[-1])
        return token if token is not None else self.layout.start_token

    def _sync(self, mb: MicroBatch) -> None:
        """Requests the coordinator answered meanwhile leave the micro-batch (and the stages).
        A decoder-only request always has its first token here; a T5 one may have none."""
        for part in (mb.running, mb.joining):
            for wire_id in list(part):
                request = self.co.table.get_wire(wire_id)
                if request is None or request.state is State.DONE or (
                        request.last_token is None and not self.layout.cross):
                    part.remove(wire_id)
                    mb.free.append(wire_id)

    def _free_later(self, wire_id: str) -> None:
        min(self.micro, key=lambda m: len(m.free)).free.append(wire_id)

    def on_pass_done(self, worker: WorkerInfo, msg: P.PassDone) -> None:
        now = time.time()
        ids = self._encoding.pop(msg.pass_id, None)
        if ids is not None:
            if msg.error is not None:
                self._failed(ids, msg, BadRequest, worker)
            else:
                self._encode_done(ids, msg, now)
            return
        mb = next((m for m in self.micro if m.busy == msg.pass_id), None)
        if mb is None or mb.index != msg.stream:
            self.co.log.warning("stale_pass_done", worker=worker.worker_id, pass_id=msg.pass_id,
                                stream=msg.stream)
            return
        mb.busy = None
        if msg.error is not None:
            self._failed(tuple(mb.running), msg, InternalError, worker)
            mb.running = []
            return
        size = len(mb.running)
        for update in msg.updates:
            if update.req_id in mb.running:
                self.co.on_tokens(update, now)
                if update.finished:  # the last stage freed it; the others learn it now
                    mb.running.remove(update.req_id)
                    mb.free.append(update.req_id)
        if size:
            self.co.metrics.on_pass(mb.index, "decode", size, msg.stage_times)

    def _failed(self, ids: tuple[str, ...], msg: P.PassDone, error: type,
                worker: WorkerInfo) -> None:
        self.counters["failed_passes"] += 1
        self.co.log.warning("pass_failed", worker=worker.worker_id, pass_id=msg.pass_id,
                            kind=msg.kind, requests=len(ids), error=msg.error)
        for wire_id in ids:
            self._free_later(wire_id)
            request = self.co.table.get_wire(wire_id)
            if request is not None:
                self.co.fail(request, error(
                    f"stage {msg.worker_id} failed the {msg.kind} pass of {len(ids)} "
                    f"request(s): {msg.error}", req_id=request.req_id))

    def describe(self) -> dict[str, Any]:
        return {"policy": "waa", "B_E": self.co.sizer.plan_batch, "B_m": len(self.micro),
                "encoder_stages": [list(r) for r in self.layout.encoder],
                "decoder_stages": [list(r) for r in self.layout.decoder],
                "encoding": sum(len(ids) for ids in self._encoding.values()),
                "streams": [{"running": len(m.running), "joining": len(m.joining),
                             "busy": m.busy is not None} for m in self.micro],
                "relayout": self.switch.describe() if self.switch is not None else None,
                **self.counters}
