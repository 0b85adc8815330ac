"""A stage worker of a staged WAA plan (coordinator/waa_pipeline.py): the StageLoop of
decoder_worker/pipeline.py plus the KV handoff between the two pipelines.

    encoder stage   StagePass(encode) --run--> hidden to "next" (or, on the last encoder
                    stage, PassDone with the first tokens to the coordinator; T5: updates
                    without a token) and, for each request and route in
                    config["pipeline"]["waa"]["routes"], a KVHandoff of the route's layers to
                    peer "kv<k>" (decoder stage k; T5: only the last encoder stage has routes,
                    its handoffs carry cross K/V); then the batch's KV is freed here
    decoder stage   KVHandoff --> pending; StagePass(decode) --wait until every request's KV
                    is whole (KV_WAIT_S at most: then the pass fails like a bad pass)--> join
                    new requests --run--> hidden to "next" / PassDone with one token each

While a decode pass waits for KV, other passes that arrive are held back in order (``later``)
and run after it; a Shutdown or Stop ends the wait at once. KV that will not join fails its
pass; on a TP stage a RuntimeError there is a broken collective (the join broadcasts the KV to
the other ranks): the worker fails, its goodbye drops the group at once (common/workermain.py).

A live re-layout (coordinator.relayout.WaaRelayout) re-Assigns the stage another side, index
or layer range (``config["relayout"]``): the loop returns with ``switch_to`` (its backend and
every KV it held go) and common.roleswitch builds the new stage's loop from host memory.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import time
from typing import Any

from common import protocol as P
from common.backend_stage import PassOutput
from common.backend_waa_stage import WaaDecoderStage, WaaEncoderStage, payload
from common.engine.kv_cache import KVExport
from common.workerconfig import WorkerConfig
from common.workerlink import Rejoin, Stop, WorkerLink
from common.workermain import FollowerLoop, check_same_model
from decoder_worker.pipeline import NEXT, StageLoop, pipeline_place

KV_WAIT_S = 10.0  # a decode pass waits this long for its requests' KV, at most


def waa_place(assign: P.Assign) -> dict[str, Any] | None:
    """The Assign's ``waa`` section (side, index, count, routes), or None (not staged WAA)."""
    place = assign.config.get("pipeline")
    waa = place.get("waa") if isinstance(place, dict) else None
    return waa if isinstance(waa, dict) else None


def build_waa_loop(cfg: WorkerConfig, link: WorkerLink, assign: P.Assign, log: Any,
                   tp: Any = None) -> StageLoop | FollowerLoop:
    """This worker's loop: an encoder or decoder stage of the engine over its layer range
    (a TP rank > 0 mirrors its rank 0). ``tp``: a TP group formed live (decoder_worker.regroup),
    else the launch's (``--tp-init``)."""
    waa = waa_place(assign)
    assert waa is not None
    pipeline_place(cfg, assign)
    if cfg.backend != "engine":
        raise ValueError("a staged WAA worker runs a real model (--model), not the null model")
    from common.backend_engine import load_spec
    from common.weightstore import host_weights, spec_from_host

    assert cfg.model is not None and assign.layer_range is not None
    # an adapting coordinator may re-lay the stages out: rebuild from host memory then
    spec = (spec_from_host(cfg.model)[0] if host_weights(cfg, assign, regroupable=True)
            else load_spec(cfg.model))
    check_same_model(spec.config, assign)
    layers = (int(assign.layer_range[0]), int(assign.layer_range[1]))
    side, index, count = waa["side"], int(waa["index"]), int(waa["count"])
    stage = _build_stage(cfg, spec, side, layers, tp)
    _check_ends(stage.is_first, stage.is_last, index, count, layers)
    if cfg.tp_rank > 0:  # with the link: a live re-group's Assign reaches it there
        return FollowerLoop(stage, link, log)
    if side == "encoder":
        routes = [(str(peer), (int(rng[0]), int(rng[1]))) for peer, rng in waa["routes"]]
        return EncoderStageLoop(cfg, link, stage, log, routes)  # type: ignore[arg-type]
    return DecoderStageLoop(cfg, link, stage, log)  # type: ignore[arg-type]


def _build_stage(cfg: WorkerConfig, spec: Any, side: str, layers: tuple[int, int],
                 tp: Any = None) -> WaaEncoderStage | WaaDecoderStage:
    if cfg.tp_size == 1:
        cls = WaaEncoderStage if side == "encoder" else WaaDecoderStage
        return cls(spec, layers, None, cfg.dtype, cfg.device)
    from common.backend_engine_tp import init_tp_group
    from common.backend_waa_stage_tp import TPWaaDecoderStage, TPWaaEncoderStage

    if tp is None:
        assert cfg.tp_init is not None
        tp = init_tp_group(cfg.tp_init, cfg.tp_rank, cfg.tp_size, cfg.heartbeat_timeout_s * 4)
    tp_cls = TPWaaEncoderStage if side == "encoder" else TPWaaDecoderStage
    return tp_cls(spec, tp, layers, None, cfg.dtype, cfg.device)


def _check_ends(is_first: bool, is_last: bool, index: int, count: int, layers: tuple) -> None:
    if (is_first, is_last) != (index == 0, index == count - 1):
        raise ValueError(f"stage {index} of {count} got layers {list(layers)}, which do not "
                         "start / end where its place in the pipeline says")


class WaaRelayoutMixin:
    """A staged WAA stage's re-Assign: the loop ends with ``switch_to`` (the worker's main
    loop builds the new stage's loop: common.roleswitch), as the side may change."""

    switch_to: P.Assign | None = None
    exit_code: int | None

    def relayout(self, assign: P.Assign) -> None:
        if waa_place(assign) is None:
            raise ValueError("a staged WAA stage was re-assigned outside a staged WAA layout")
        self.switch_to, self.exit_code = assign, 0


class EncoderStageLoop(WaaRelayoutMixin, StageLoop):
    """Encode passes; each request's KV goes to the decoder stages holding its layers."""

    def __init__(self, cfg: WorkerConfig, link: WorkerLink, backend: WaaEncoderStage, log: Any,
                 routes: list[tuple[str, tuple[int, int]]]) -> None:
        super().__init__(cfg, link, backend, log)
        self.enc = backend
        self.routes = routes
        self.kv_bytes_sent = 0

    def load(self) -> dict[str, Any]:
        return {**super().load(), "kv_bytes_sent": self.kv_bytes_sent}

    def hand_on(self, sp: P.StagePass, out: PassOutput, times: tuple[float, ...]) -> None:
        if not self.enc.is_last:
            self.link.send(dataclasses.replace(sp, hidden=out.hidden, stage_times=times),
                           decoder_id=NEXT)
        firsts = {t.req_id: t.token for t in out.tokens}
        keep = [r for r in sp.req_ids if r in self.enc.seqs]  # the last stage dropped the
        # finished ones; T5's stages before the last hand on no KV (no routes)
        exports = self.enc.export_batch(keep, sp.stream) if keep and self.routes else {}
        for req in sp.requests:
            if req.req_id in exports:
                self.send_kv(req, exports[req.req_id], firsts.get(req.req_id, -1))
        t_sent = time.time()
        self.enc.drop(sp.req_ids)
        if self.enc.is_last:
            sent = P.Lifecycle(t_kv_sent=t_sent)
            updates = tuple(P.TokenUpdate(req_id=t.req_id, tokens=(t.token,),
                                          finished=t.finished, finish_reason=t.reason,
                                          lifecycle=sent) for t in out.tokens)
            if not self.enc.emits_first_token:  # T5: no token yet, only the KV's lifecycle
                updates = tuple(P.TokenUpdate(req_id=r, tokens=(), lifecycle=sent)
                                for r in keep)
            self.tokens_out += len(out.tokens)
            self.link.send(P.PassDone(worker_id=self.cfg.worker_id, pass_id=sp.pass_id,
                                      stream=sp.stream, kind=sp.kind, updates=updates,
                                      stage_times=times))

    def send_kv(self, req: P.EncodeRequest, exp: KVExport, first_token: int) -> None:
        for peer, layers in self.routes:
            kv = payload(req.req_id, exp, layers)
            self.link.send(P.KVHandoff(req_id=req.req_id, encoder_id=self.cfg.worker_id,
                                       first_token=first_token,
                                       prompt_len=len(req.prompt_ids),
                                       max_new_tokens=req.max_new_tokens,
                                       sampling=req.sampling, kv=kv,
                                       lifecycle=req.lifecycle,
                                       output_offset=req.output_offset), decoder_id=peer)
            self.kv_bytes_sent += sum(int(t.nbytes) for t in kv.tensors.values())


class DecoderStageLoop(WaaRelayoutMixin, StageLoop):
    """Decode passes of the micro-batches; requests join once their KV is whole."""

    def __init__(self, cfg: WorkerConfig, link: WorkerLink, backend: WaaDecoderStage,
                 log: Any) -> None:
        super().__init__(cfg, link, backend, log)
        self.dec = backend
        self.later: collections.deque[P.Message | Stop] = collections.deque()
        self.kv_bytes_received = 0

    def load(self) -> dict[str, Any]:
        return {**super().load(), "kv_bytes_received": self.kv_bytes_received}

    def next_message(self) -> P.Message | Stop | None:
        """Passes held back while one waited for KV go first, in order."""
        return self.later.popleft() if self.later else super().next_message()

    def handle(self, msg: P.Message | Stop) -> None:
        if isinstance(msg, P.KVHandoff):
            self.take(msg)
            return
        if isinstance(msg, Rejoin):  # a restarted coordinator knows none of the pending KV
            self.dec.drop(list(self.dec.pending))
        super().handle(msg)

    def take(self, h: P.KVHandoff) -> None:
        try:
            self.dec.take(h)
        except ValueError as exc:
            self.link.limited.error("bad_kv_handoff", req_id=h.req_id, error=str(exc))
            self.link.send(P.Error(code="internal", req_id=h.req_id, message=str(exc)))
            return
        self.kv_bytes_received += sum(int(t.nbytes) for t in h.kv.tensors.values())

    def run_pass(self, sp: P.StagePass) -> None:
        if sp.kind == "decode":
            self.dec.drop(sp.free)
            missing = self.wait_for_kv(sp)
            if missing:
                self.dec.drop(sp.req_ids)
                self.fail(sp, f"the KV of requests {missing[:5]} did not arrive within "
                              f"{KV_WAIT_S:g} s")
                return
            try:
                self.dec.join(sp)
            except (ValueError, RuntimeError) as exc:
                if isinstance(exc, RuntimeError) and self.cfg.tp_size > 1:
                    # a TP stage's join is a collective (rank 0 broadcasts the KV): a broken
                    # one (gloo raises a plain RuntimeError when a peer rank died) leaves the
                    # ranks out of lockstep, so the worker fails: run_worker's goodbye has the
                    # coordinator drop the group at once (no heartbeat-deadline wait)
                    raise
                self.dec.drop(sp.req_ids)
                self.fail(sp, f"could not take the KV handed over: {exc}")
                return
        super().run_pass(sp)

    def wait_for_kv(self, sp: P.StagePass) -> list[str]:
        """Take KVHandoffs until the pass's requests are whole; what is still missing."""
        deadline = time.monotonic() + KV_WAIT_S
        while missing := self.dec.waiting_for(sp):
            left = deadline - time.monotonic()
            if left <= 0:
                return missing
            try:
                msg = self.link.inbox.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if isinstance(msg, P.KVHandoff):
                self.take(msg)
                continue
            self.later.append(msg)
            if isinstance(msg, (P.Shutdown, Stop)):
                return missing
        return []

    def hand_on(self, sp: P.StagePass, out: PassOutput, times: tuple[float, ...]) -> None:
        if not self.dec.is_last:
            super().hand_on(sp, out, times)
            return
        got = self.dec.t_kv_received
        updates = tuple(P.TokenUpdate(
            req_id=t.req_id, tokens=(t.token,), finished=t.finished, finish_reason=t.reason,
            lifecycle=(P.Lifecycle(t_kv_received=got[t.req_id]) if t.req_id in got
                       else None)) for t in out.tokens)
        self.tokens_out += len(updates)
        self.link.send(P.PassDone(worker_id=self.cfg.worker_id, pass_id=sp.pass_id,
                                  stream=sp.stream, kind=sp.kind, updates=updates,
                                  stage_times=times))
