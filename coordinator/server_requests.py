"""The coordinator's request side (a mixin of Coordinator, coordinator/server.py): encode
batches out, decoder tokens in, and every way a request ends (finish, fail, re-run)."""

from __future__ import annotations

import time
from typing import Any

from common import protocol as P
from common.errors import ServerError, Unavailable, WorkerLost
from common.models.config import ModelConfig
from coordinator.adjust import BatchSizer
from coordinator.batching import pick_encoder, place_batch
from coordinator.config import CoordinatorConfig
from coordinator.membership import Membership
from coordinator.metrics import Metrics
from coordinator.pipeline_driver import PipelineDriver
from coordinator.relay import Relay
from coordinator.replan_live import LiveReplanner
from coordinator.requests import ReplayMismatch, Request, RequestTable, State
from coordinator.waa_pipeline import WaaPipelineDriver

MAX_RERUNS = 3  # a request whose workers keep dying (a poison request?) fails after this


class RequestHandling:
    """The request half of Coordinator; Coordinator owns the state these methods use."""

    cfg: CoordinatorConfig
    log: Any
    model: ModelConfig
    sizer: BatchSizer
    table: RequestTable
    instance: str
    pipeline: PipelineDriver | WaaPipelineDriver | None
    metrics: Metrics
    adapter: Any
    replanner: LiveReplanner
    members: Membership
    relay: Relay
    draining: bool
    counters: dict[str, int]
    _batch_id: int

    def schedule(self) -> None:
        """Send encode batches while an encoder and decoder slots are free."""
        if self.pipeline is not None:
            self.pipeline.schedule()  # pipeline plans: each idle stream's next pass
            return
        while self.table.num_queued and self.members.serving:
            encoder = pick_encoder(self.members.ready("encoder"),
                                   self.cfg.max_outstanding_batches)
            if encoder is None:
                return
            decoders = self.members.ready("decoder")
            queued = self.table.peek_queued(min(2 * self.sizer.plan_batch, encoder.capacity))
            running = sum(d.num_active for d in decoders)
            decision = self.sizer.size([r.num_prompt_tokens for r in queued], running)
            placed = place_batch(queued, decoders, min(decision.size, encoder.capacity))
            if not placed:
                return
            if decision.reason != "plan":
                self.counters["be_adjustments"] += 1
                self.log.info("be_adjusted", size=len(placed), plan_B_E=self.sizer.plan_batch,
                              running=running, reason=decision.reason,
                              token_sum=sum(r.num_prompt_tokens for r, _ in placed))
            self.metrics.on_encode_batch(encoder.worker_id, len(placed),
                                         sum(r.num_prompt_tokens for r, _ in placed),
                                         decision.reason != "plan", decision.reason)
            self._batch_id += 1
            self.members.send_batch(encoder, self._batch_id, placed)
            self.log.debug("encode_batch", batch_id=self._batch_id, encoder=encoder.worker_id,
                           size=len(placed))

    def on_tokens(self, update: P.TokenUpdate, now: float) -> bool:
        """Relay one decoder update; False when the request is unknown (tell the decoder)."""
        request = self.table.get_wire(update.req_id)  # a stale run's id resolves to nothing
        if request is None:
            return False
        request.times.take(update.lifecycle)
        try:
            start = request.add_tokens(update.tokens, now)
        except ReplayMismatch as exc:  # a re-run diverged: an error, never a broken stream
            self.counters["replay_mismatch"] = self.counters.get("replay_mismatch", 0) + 1
            self.fail(request, WorkerLost(str(exc), req_id=request.req_id))
            return True
        fresh = tuple(request.tokens[start:])
        if request.stream and fresh:
            self.relay.chunk(request, start, fresh)
        if update.finished or request.complete:
            self.finish(request, update.finish_reason or "length", now)
        return True

    def finish(self, request: Request, reason: str, now: float) -> None:
        request.close(now)
        self.table.remove(request.req_id)
        self.members.release(request)
        self.counters["completed"] += 1
        self.counters["tokens_out"] += len(request.tokens)
        self.metrics.on_finish(request, reason)
        if self.adapter is not None:
            self.adapter.observe_finish(request)
        self.relay.result(request, reason)
        self.log.debug("request_done", req_id=request.req_id, tokens=len(request.tokens),
                       decoder=request.decoder)

    def fail(self, request: Request, exc: ServerError) -> None:
        """Answer ``request`` with an error (exactly once) and free it everywhere."""
        if request.state is State.DONE:
            return
        was_encoding = request.state is State.ENCODING
        request.close(time.time())
        self.table.remove(request.req_id)
        self.members.release(request, cancel=True, encoding=was_encoding)
        self.counters["failed"] += 1
        self.metrics.on_fail(request, exc.code)
        if self.adapter is not None:
            self.adapter.observe_finish(request, exact=False)
        self.log.info("request_failed", req_id=request.req_id, code=exc.code, error=exc.message)
        self.relay.error(request, exc)

    def rerun_or_fail(self, request: Request, lost: str, role: str, why: str) -> None:
        """A worker holding ``request`` died: run it again from its prompt plus the tokens
        the client already has (an encoder-decoder model: from its prompt, replaying those
        tokens; coordinator/requests.py), so the stream continues at the next index with
        nothing twice; or answer WorkerLost when no worker of that role is left or it was
        re-run too often."""
        if request.state is State.DONE:
            return
        left = bool(self.members.ready(role))
        if role not in ("encoder", "decoder") or not left or request.attempt >= MAX_RERUNS:
            reason = ("pipeline stages do not re-run requests" if role not in ("encoder",
                                                                             "decoder")
                      else f"no {role} worker remains" if not left
                      else f"re-run {request.attempt} times already")
            self.fail(request, WorkerLost(f"worker {lost} was lost ({why}); {reason}",
                                          req_id=request.req_id))
            return
        self.members.release(request, cancel=True, encoding=request.state is State.ENCODING)
        self.table.requeue(request)
        self.counters["rerun"] = self.counters.get("rerun", 0) + 1
        self.log.warning("request_rerun", req_id=request.req_id, lost=lost,
                         tokens_kept=len(request.tokens), replay=request.replaying,
                         attempt=request.attempt)

    def fail_queued_unavailable(self) -> None:
        missing = self.members.missing_roles()
        for request in self.table.peek_queued(self.table.num_queued):
            self.fail(request, Unavailable(f"no {'/'.join(missing)} worker is available",
                                           req_id=request.req_id))

    def stats(self, include_requests: bool = False) -> dict[str, Any]:
        """Counters and workers, plus what coordinator/metrics.py measured (docs/stats.md)."""
        workers = self.members.describe()
        return {"requests": {**self.counters, "in_flight": len(self.table),
                             "queued": self.table.num_queued},
                "workers": workers, "model": self.model.name,
                "draining": self.draining, "instance": self.instance,
                **({"pipeline": self.pipeline.describe()} if self.pipeline else {}),
                **({"adapt": self.adapter.describe()} if self.adapter else {}),
                "membership": self.replanner.describe(),
                **self.metrics.snapshot(include_requests, workers)}
