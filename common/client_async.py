"""`AsyncClient`: many concurrent requests over one DEALER socket, replies routed by req_id.

Two tasks run per client: the reader (every reply goes to its request's queue) and the
watcher (connection events: a refused handshake or a dropped connection fails the waiting
requests at once instead of leaving them to their timeouts).

Every operation on the socket goes through the asyncio wrapper, never a plain shadow of it:
libzmq signals "readable" on one edge-triggered FD, and any call on the socket (a send too)
may consume that edge; only the wrapper re-checks the socket's EVENTS afterwards and wakes
the reader. A plain send of a Cancel once ate the wake-up of replies that arrived just before
it, so requests waited for their timeouts (tests/mesh/test_client_wakeups.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from common import protocol as P
from common.client_keys import CONNECTION_EVENTS, curve_client_keys, handshake_refused
from common.client_stream import AsyncStream, next_reply, submit_message
from common.errors import (
    AuthenticationFailed,
    Cancelled,
    CoordinatorLost,
    ProtocolError,
    Timeout,
)
from common.sockets import (
    ENV_COORDINATOR_ENDPOINT,
    CurveKeys,
    arecv_msg,
    asend_msg,
    check_endpoint,
    endpoint_from_env,
    make_socket,
)

DEFAULT_TIMEOUT_S = 600.0


class AsyncClient:
    """asyncio client; safe for many concurrent requests from one event loop."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        default_timeout_s: float | None = DEFAULT_TIMEOUT_S,
        curve: CurveKeys | None = None,
        limits: P.Limits = P.DEFAULT_LIMITS,
        server_public_key: str | None = None,
        client_keys: str | tuple[str, str] | None = None,
    ) -> None:
        """``server_public_key`` (z85 text or the server.key file) and ``client_keys`` (this
        client's .key_secret file, or (public, secret) z85 text) turn on CURVE; both default
        to ``EXEGPT_CURVE_SERVER_PUBLIC`` / ``EXEGPT_CURVE_CLIENT_KEY`` when set."""
        self.endpoint = endpoint or endpoint_from_env(ENV_COORDINATOR_ENDPOINT)
        self.default_timeout_s = default_timeout_s
        self._curve = curve or curve_client_keys(server_public_key, client_keys)
        self._limits = limits
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._auth_error: AuthenticationFailed | None = None
        self._broken: ProtocolError | None = None  # the reader died: nothing can be answered
        self._refused: asyncio.Event = asyncio.Event()
        self._connected = False  # a handshake succeeded and no disconnect since
        self._pending: dict[str, asyncio.Queue[Any]] = {}

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _ensure_started(self) -> None:
        loop = asyncio.get_running_loop()
        if self._reader is not None and self._reader.get_loop() is not loop:
            raise RuntimeError("an AsyncClient belongs to the event loop that first used it; "
                               "create one client per event loop (or close() it first)")
        if self._sock is None:
            # the process-wide context: a private one would block in term() at garbage
            # collection if a user forgot close()
            self._ctx = zmq.asyncio.Context.instance()
            # connect only once the monitor listens: libzmq reports a refused handshake
            # once and does not retry, so a missed event would leave only the timeout
            self._sock = make_socket(self._ctx, "DEALER", connect=(), curve_client=self._curve)
            monitor = self._sock.get_monitor_socket(CONNECTION_EVENTS)
            self._sock.connect(check_endpoint(self.endpoint))
            self._broken = None
            self._reader = loop.create_task(self._read_forever())
            self._reader.add_done_callback(self._reader_stopped)
            self._refused = asyncio.Event()
            self._watcher = loop.create_task(self._watch_handshakes(monitor))

    async def close(self) -> None:
        """Stop reading, fail waiting requests with Cancelled, close the socket."""
        if self._sock is not None:
            # before the watcher closes its end: libzmq sends monitor events blocking, so an
            # event (a disconnect) towards a closed monitor socket would deadlock this call
            self._sock.disable_monitor()
        for task in (self._reader, self._watcher):
            if task is not None and not task.done():
                task.cancel()
                if task.get_loop() is asyncio.get_running_loop():
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        self._fail_all(Cancelled("client closed"))
        if self._sock is not None:
            self._sock.close(linger=0)
        self._sock = self._ctx = self._reader = self._watcher = None

    async def _watch_handshakes(self, monitor: Any) -> None:
        """Turn a refused handshake into AuthenticationFailed, and a dropped connection into
        CoordinatorLost, for every waiting request.

        Why: the server cannot answer a peer it did not authenticate, and libzmq retries the
        connection silently; without this a caller would only ever see a Timeout. A dropped
        connection loses the replies of every request in flight (a restarted coordinator does
        not know them; even the same one would route them to the old connection)."""
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self._auth_error = None
                    self._refused.clear()
                    self._connected = True
                elif event["event"] == zmq.EVENT_DISCONNECTED:
                    if self._connected:
                        self._connected = False
                        self._connection_lost()
                else:
                    self._auth_error = handshake_refused(self.endpoint, event["event"],
                                                         event["value"])
                    self._refused.set()
                    self._fail_all(self._auth_error)
        finally:
            monitor.close(linger=0)

    def _connection_lost(self) -> None:
        """Fail every request in flight with CoordinatorLost; a Cancel for each follows the
        Submit that may still sit in the socket's queue, so a new coordinator that receives
        that Submit after reconnecting drops it instead of running it for nobody."""
        for req_id, queue in list(self._pending.items()):
            queue.put_nowait(CoordinatorLost(
                f"the connection to the coordinator at {self.endpoint} dropped while this "
                "request was in flight (the coordinator stopped or restarted); retry it",
                req_id=req_id))
            self._send_nowait(P.Cancel(req_id, "the client lost the coordinator"))

    async def _read_forever(self) -> None:
        while True:
            try:
                msg = await arecv_msg(self._sock, limits=self._limits)
            except ProtocolError:
                continue  # a garbled reply cannot be routed; its request times out
            req_id = getattr(msg, "req_id", None)
            queue = self._pending.get(req_id) if req_id is not None else None
            if queue is not None:
                queue.put_nowait(msg)

    def _reader_stopped(self, task: asyncio.Task[None]) -> None:
        """A reader that died (not cancelled by close) fails every waiting request and every
        later one: nothing would ever route their replies, so they could only time out."""
        if task.cancelled() or task.exception() is None:
            return
        self._broken = ProtocolError(f"the client's reply reader stopped: "
                                     f"{task.exception()!r}; close() this client and retry")
        self._fail_all(self._broken)

    def _fail_all(self, exc: BaseException) -> None:
        for queue in self._pending.values():
            queue.put_nowait(exc)

    # ------------------------------------------------------------------ requests

    async def generate(self, prompt: str | None = None, **kwargs: Any) -> P.Result:
        """Run one request to completion; see `submit_message` for the arguments."""
        async with self.stream(prompt, **{**kwargs, "stream": False}) as s:
            async for _ in s:
                pass
        assert s.result is not None
        return s.result

    def stream(self, prompt: str | None = None, **kwargs: Any) -> AsyncStream:
        """Start a request whose tokens arrive as StreamChunks (iterate the returned object)."""
        return AsyncStream(self, submit_message(prompt, **kwargs))

    async def cancel(self, req_id: str, reason: str = "cancelled by client") -> None:
        """Ask the server to stop the request; a caller waiting on it gets Cancelled."""
        queue = self._pending.get(req_id)
        if queue is not None:
            queue.put_nowait(Cancelled(reason, req_id=req_id))
        self._send_nowait(P.Cancel(req_id, reason))

    async def stats(self, *, include_requests: bool = False, timeout_s: float = 10.0) -> P.Stats:
        """What the coordinator measured (docs/stats.md): ``.stats`` is the dict (counters,
        workers, ``overall``, ``per_worker``, ``plan``/``vs_plan``); with ``include_requests``
        ``.requests`` maps the recent finished requests' ids to their Lifecycle timestamps."""
        req_id = uuid.uuid4().hex
        queue = self._register(req_id)
        try:
            deadline = time.monotonic() + timeout_s
            await self._send(P.StatsRequest(req_id, include_requests), deadline, req_id)
            msg = await next_reply(queue, deadline, req_id)
        finally:
            self._pending.pop(req_id, None)
        if isinstance(msg, P.Stats):
            return msg
        raise ProtocolError(f"expected Stats, got {type(msg).__name__}")

    async def _send(self, msg: P.Message, deadline: float | None, req_id: str) -> None:
        """Send, giving up on a refused handshake or at the deadline: a DEALER whose
        connection never completes (refused by CURVE) would otherwise block the send forever."""
        send = asyncio.ensure_future(asend_msg(self._sock, msg))
        refused = asyncio.ensure_future(self._refused.wait())
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, _ = await asyncio.wait({send, refused}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        refused.cancel()
        if send in done:
            send.result()
            return
        send.cancel()
        if self._auth_error is not None:
            raise self._auth_error
        raise Timeout("could not send the request before its timeout (is the server up?)",
                      req_id=req_id)

    def _send_nowait(self, msg: P.Message) -> None:
        """Best-effort (Cancel): never waits; a full or refused connection drops it. Behind a
        Submit still waiting to be sent it queues, and so follows that Submit."""
        if self._sock is not None:
            sent = self._sock.send_multipart(P.encode(msg), flags=zmq.NOBLOCK, copy=False)
            sent.add_done_callback(_drop_outcome)

    def _register(self, req_id: str) -> asyncio.Queue[Any]:
        self._ensure_started()
        if self._auth_error is not None:
            raise self._auth_error
        if self._broken is not None:
            raise self._broken
        if req_id in self._pending:
            raise ValueError(f"req_id {req_id!r} is already in flight on this client")
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._pending[req_id] = queue
        return queue

    def _forget(self, req_id: str, cancel_reason: str | None) -> bool:
        """Stop routing replies to ``req_id`` (False: it was not waiting); with a reason the
        server is asked to stop the request too."""
        if self._pending.pop(req_id, None) is None:
            return False
        if cancel_reason is not None:
            self._send_nowait(P.Cancel(req_id, cancel_reason))
        return True


def _drop_outcome(sent: asyncio.Future[Any]) -> None:
    """A best-effort send's failure (EAGAIN, closed socket) is expected: retrieve it so asyncio
    does not log it as never retrieved."""
    if not sent.cancelled():
        sent.exception()
