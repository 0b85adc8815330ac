"""The coordinator's client-facing messages (a mixin of Coordinator, coordinator/server.py):
Submit -> admission, Cancel -> fail, StatsRequest -> Stats; anything else is a bad request."""

from __future__ import annotations

import time
from typing import Any

from common import protocol as P
from common.errors import Cancelled, ProtocolError, ServerError
from common.models.config import ModelConfig
from coordinator import admission
from coordinator.config import CoordinatorConfig
from coordinator.membership import Membership
from coordinator.metrics import Metrics
from coordinator.relay import Relay
from coordinator.requests import RequestTable


class ClientHandling:
    """The client half of Coordinator; Coordinator owns the state these methods use (and
    ``fail`` / ``stats`` come from RequestHandling)."""

    cfg: CoordinatorConfig
    log: Any
    model: ModelConfig
    tokenizer: Any
    table: RequestTable
    members: Membership
    relay: Relay
    metrics: Metrics
    adapter: Any
    drain_meter: admission.DrainMeter
    bad_log: admission.LogBudget
    draining: bool
    counters: dict[str, int]

    def on_client_frames(self, frames: list[Any]) -> None:
        client = frames[0].bytes
        try:
            msg = P.decode(frames[1:])
        except ProtocolError as exc:
            self.counters["protocol_errors"] += 1
            suppressed = self.bad_log.allow(time.monotonic())
            if suppressed is not None:  # a flood of bad messages must not flood the disk
                self.log.warning("bad_client_message", error=str(exc), suppressed=suppressed)
            self.relay.send_now(client, P.Error(code="protocol_error", message=str(exc),
                                                req_id=P.peek_req_id(frames[1:])))
            return
        if isinstance(msg, P.Submit):
            self.on_submit(client, msg)
        elif isinstance(msg, P.Cancel):
            self.on_cancel(client, msg)
        elif isinstance(msg, P.StatsRequest):
            self.relay.send_now(client, P.Stats(
                req_id=msg.req_id, stats=self.stats(msg.include_requests),
                requests=self.metrics.lifecycles() if msg.include_requests else {}))
        else:
            self.relay.send_now(client, P.Error(
                code="bad_request", message=f"clients may not send {type(msg).__name__}",
                req_id=getattr(msg, "req_id", None)))

    def on_submit(self, client: bytes, msg: P.Submit) -> None:
        if self.members.serving and not self.members.can_serve():
            missing = "/".join(self.members.missing_roles())
            self.relay.send_now(client, P.Error(code="unavailable", req_id=msg.req_id,
                                                message=f"no {missing} worker is available"))
            return
        self.drain_meter.observe(time.monotonic(),
                                 self.counters["completed"] + self.counters["failed"])
        try:
            request = admission.admit(msg, client, self.cfg, self.table, self.draining,
                                      self.model.vocab_size, tokenizer=self.tokenizer,
                                      max_position=self.model.max_position,
                                      drain=self.drain_meter)
        except ServerError as exc:
            self.relay.send_now(client, admission.error_message(exc))
            return
        self.counters["submitted"] += 1
        if self.adapter is not None:
            self.adapter.observe_arrival(request)

    def on_cancel(self, client: bytes, msg: P.Cancel) -> None:
        request = self.table.get(msg.req_id)
        if request is None or request.client != client:
            return  # already answered (or not this client's): cancelling is idempotent
        self.fail(request, Cancelled(msg.reason or "cancelled by the client",
                                     req_id=request.req_id))
