"""The coordinator process: asyncio on uvloop, two ROUTER sockets, one request table.

    clients  DEALER --Submit/Cancel/StatsRequest--> ROUTER (client endpoint)
    workers  DEALER --Hello/Ready/Heartbeat/DecodeTokens/Error--> ROUTER (worker endpoint)

The event loop runs two things::

    pump()   on either socket readable: drain client messages (admit / cancel / stats) and
             worker messages (membership / relay tokens), then schedule() and flush()
    tick()   every heartbeat interval: heartbeats out, silent workers lost, deadlines

``pump`` drains everything readable with non-blocking receives before it schedules and
flushes, so under load many decoder steps become one StreamChunk per request (the coalescing
costs no latency: nothing is held back waiting). Why not ``zmq.asyncio`` futures: a future per
message costs more than the message, and ZeroMQ's FD is edge-triggered, so one socket's sends
can swallow the other task's wake-up. Here the loop watches both FDs with ``add_reader`` and,
after every pump, re-checks ``EVENTS`` of both sockets before going back to sleep.
Request states: ``coordinator/requests.py``; worker membership: ``coordinator/membership.py``;
token relay: ``coordinator/relay.py``; client messages: ``coordinator/server_clients.py``;
scheduling and request endings: ``coordinator/server_requests.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import uuid
from typing import Any

import zmq

from common.errors import ShuttingDown, Timeout
from common.models.config import ModelConfig
from common.procs import write_status
from common.sockets import bound_endpoint, make_socket
from coordinator import admission, auth, layout_state
from coordinator.adjust import Band, BatchSizer
from coordinator.config import CoordinatorConfig
from coordinator.membership import Membership
from coordinator.metrics import Metrics, load_plan
from coordinator.pipeline_driver import PipelineDriver
from coordinator.relay import Relay
from coordinator.replan_live import LiveReplanner
from coordinator.requests import RequestTable
from coordinator.server_clients import ClientHandling
from coordinator.server_requests import MAX_RERUNS as MAX_RERUNS  # importable as before
from coordinator.server_requests import RequestHandling
from coordinator.waa_layout import staged
from coordinator.waa_pipeline import WaaPipelineDriver

DRAIN_BUDGET = 4096  # messages per socket per pump, at most ...
PUMP_BUDGET_S = 0.02  # ... and this much time, before yielding to tick()
WORKER_RCVHWM = 100  # per worker: a decoder running ahead blocks (and coalesces) on its side
# a client message is a type byte and a body (<= 16 MiB, Limits.max_body_bytes); libzmq drops
# a peer that sends more than this before the coordinator allocates it
CLIENT_MAX_MSG_BYTES = 32 << 20


def load_model_config(cfg: CoordinatorConfig) -> ModelConfig:
    """The served model's shape: a JSON file the launcher wrote, else a preset (null model)."""
    if cfg.model_config is None:
        return ModelConfig.preset(cfg.model_shape)
    with open(cfg.model_config, encoding="utf-8") as handle:
        return ModelConfig.from_dict(json.load(handle))


def load_tokenizer(source: str | None) -> Any:
    """The model's tokenizer (torch-free: the ``tokenizers`` library), or None (ids only)."""
    if source is None:
        return None
    if source.endswith(".gguf"):
        from gguf import GGUFReader

        from common.models.tokenizer import tokenizer_from_gguf

        return tokenizer_from_gguf(GGUFReader(source))
    from common.models.tokenizer import load_hf_tokenizer

    return load_hf_tokenizer(source)


class Coordinator(ClientHandling, RequestHandling):
    """State and I/O of the control plane; see the module docstring for the loop. Client
    messages: server_clients.py; request scheduling and endings: server_requests.py."""

    def __init__(self, cfg: CoordinatorConfig, log: Any) -> None:
        self.log = log
        self.model = load_model_config(cfg)
        # a layout adopted live before a restart replaces the launch layout (layout_state.py)
        cfg, self.resumed = layout_state.resume(cfg, self.model, log)
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        self.sizer = BatchSizer(cfg.max_encode_batch, cap=1 << 30,
                                token_sum=Band.parse(cfg.adjust_token_sum),
                                decode_batch=Band.parse(cfg.adjust_decode_batch))
        self.table = RequestTable(encoder_decoder=self.model.is_encoder_decoder)
        # who this process is: workers that see another instance's Heartbeat/Assign re-register
        # (a restart on the same ports; docs/mesh.md, "Coordinator restart")
        self.instance = uuid.uuid4().hex[:12]
        # rra / static / continuous plans: stage workers driven by streams (pipeline_driver)
        self.pipeline: PipelineDriver | WaaPipelineDriver | None = (
            PipelineDriver(self) if cfg.policy != "waa"
            else WaaPipelineDriver(self) if staged(cfg)  # waa with layer ranges
            else None)
        self.metrics = Metrics(plan=load_plan(cfg.plan) if cfg.plan else None)
        self.adapter = None  # --adapt: drift -> background re-plan -> live knobs (adapt.py)
        if cfg.adapt:
            from coordinator.adapt import Adapter

            self.adapter = Adapter.from_coordinator(self, log)
        # worker lost / joined: re-plan the knobs for the live workers (replan_live.py)
        self.replanner = LiveReplanner.from_coordinator(self, log)
        layout_state.restore(self)  # the adopted plan's knobs, epoch and drift reference
        self.drain_meter = admission.DrainMeter()
        self.bad_log = admission.LogBudget()
        self.draining = False
        self.counters = {"submitted": 0, "completed": 0, "failed": 0, "tokens_out": 0,
                         "protocol_errors": 0, "be_adjustments": 0}
        self._ctx = zmq.Context()
        self._pump_pending = False
        self._stop = asyncio.Event()
        self._batch_id = 0

    # ---- lifecycle ------------------------------------------------------------------------
    async def run(self) -> int:
        self._bind()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        for raw in (self._client_raw, self._worker_raw):
            loop.add_reader(raw.getsockopt(zmq.FD), self._kick)
        self._kick()
        tasks = [asyncio.create_task(self._tick())]
        try:
            await self._stop.wait()
            await self._drain()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.adapter is not None:
                self.adapter.close()
            self.replanner.close()
            for raw in (self._client_raw, self._worker_raw):
                loop.remove_reader(raw.getsockopt(zmq.FD))
            self.members.shutdown_all("coordinator stopping")
            layout_state.clear(self)  # no worker holds the adopted layout any more
            if self.curve is not None:
                self.curve.stop()
            self._client_raw.close(linger=200)
            self._worker_raw.close(linger=500)
            self._ctx.term()
        self.log.info("stopped", **self.counters)
        return 0

    def _bind(self) -> None:
        self.curve = auth.gate_from_config(self._ctx, self.log, self.cfg)
        if self.curve is not None:
            self.curve.start()  # the ZAP handler must exist before the first handshake
        self._client_raw = make_socket(self._ctx, "ROUTER", bind=self.cfg.client_endpoint,
                                       hwm=1_000_000, router_mandatory=True,
                                       max_msg_bytes=CLIENT_MAX_MSG_BYTES,
                                       **self._curve_options(auth.CLIENT_DOMAIN))
        self._worker_raw = make_socket(self._ctx, "ROUTER", bind=self.cfg.worker_endpoint,
                                       hwm=1_000_000, router_mandatory=True,
                                       **self._curve_options(auth.WORKER_DOMAIN))
        if self.curve is not None:
            for sock, domain in ((self._client_raw, auth.CLIENT_DOMAIN),
                                 (self._worker_raw, auth.WORKER_DOMAIN)):
                if domain in self.curve.allow:
                    self.curve.watch(sock, domain)
        # applies to every worker pipe (they connect after this): bounded inbound queues
        self._worker_raw.setsockopt(zmq.RCVHWM, WORKER_RCVHWM)
        # a worker that re-registers on a fresh socket (same identity) takes its route over
        # at once, even while its old connection is still being torn down
        self._worker_raw.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.client_endpoint = bound_endpoint(self._client_raw)
        self.worker_endpoint = bound_endpoint(self._worker_raw)
        self.relay = Relay(self._client_raw, self.log, self.counters, self.tokenizer)
        self.members = Membership(self, self._worker_raw)
        write_status(self.cfg.ready_fd, "bound", client_endpoint=self.client_endpoint,
                     worker_endpoint=self.worker_endpoint)
        self.log.info("listening", client_endpoint=self.client_endpoint,
                      worker_endpoint=self.worker_endpoint, model=self.model.name,
                      instance=self.instance)

    def _curve_options(self, domain: str) -> dict[str, Any]:
        """CURVE server options for one port, when ``--curve-*`` asked for it there."""
        if self.curve is None or domain not in self.curve.allow:
            return {}
        return {"curve_server": self.curve.keys, "zap_domain": domain}

    def request_stop(self) -> None:
        if not self.draining:
            self.log.info("stop_requested", in_flight=len(self.table))
            self.draining = True
            self._stop.set()

    async def _drain(self) -> None:
        """Finish in-flight requests (queued ones included) until the drain timeout."""
        deadline = time.monotonic() + self.cfg.drain_timeout_s
        while len(self.table) and time.monotonic() < deadline and self.members.can_serve():
            await asyncio.sleep(0.02)
        for request in self.table:
            self.fail(request, ShuttingDown("the server stopped before this request finished",
                                            req_id=request.req_id))
        self.relay.flush()

    # ---- the loop -------------------------------------------------------------------------
    def _kick(self) -> None:
        """FD callback: run one pump soon (at most one pending)."""
        if not self._pump_pending:
            self._pump_pending = True
            asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        self._pump_pending = False
        deadline = time.perf_counter() + PUMP_BUDGET_S
        for raw, handle in ((self._client_raw, self.on_client_frames),
                            (self._worker_raw, self.members.on_frames)):
            for i in range(DRAIN_BUDGET):
                try:
                    frames = raw.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                try:
                    handle(frames)
                except Exception:  # noqa: BLE001 - one bad message must not stall the loop
                    self.log.exception("handler_failed")
                if i % 16 == 15 and time.perf_counter() > deadline:
                    break  # let tick() (heartbeats, deadlines) run; _rearm() continues
        self.schedule()
        self.relay.flush()
        self._rearm()

    def _rearm(self) -> None:
        """Sends and receives consume the FD's edge: look at EVENTS before sleeping."""
        pending = self._client_raw.getsockopt(zmq.EVENTS) | self._worker_raw.getsockopt(
            zmq.EVENTS)
        if pending & zmq.POLLIN:
            self._kick()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.heartbeat_interval_s)
            now = time.time()
            self.members.tick(now)
            if self.adapter is not None:
                self.adapter.tick(now)
            for request in self.table.expired(now):
                self.fail(request, Timeout("the request's deadline passed",
                                           req_id=request.req_id))
            if self.pipeline is None:
                for request in self.table.kv_overdue(now, self.cfg.kv_timeout_s):
                    self.rerun_or_fail(request, str(request.encoder), "encoder",
                                       f"no KV handoff within {self.cfg.kv_timeout_s:g} s")
            if not self.members.can_serve() and self.members.serving:
                self.fail_queued_unavailable()
            self.schedule()
            self.relay.flush()
            self._rearm()


async def serve(cfg: CoordinatorConfig, log: Any) -> int:
    coordinator = Coordinator(cfg, log)
    with contextlib.suppress(asyncio.CancelledError):
        return await coordinator.run()
    return 0
