"""The client SDK: `AsyncClient` (asyncio) and `Client` (blocking), over one DEALER socket.

    async with AsyncClient("tcp://127.0.0.1:5555") as client:
        result = await client.generate("Hello", max_new_tokens=32)      # -> protocol.Result
        async with client.stream(prompt_ids=[1, 2, 3]) as s:
            async for chunk in s:                                       # -> StreamChunk
                print(chunk.tokens)
        print(s.result.lifecycle.ttft)

    with Client("ipc:///tmp/exegpt/client.sock") as client:
        print(client.generate("Hello").text)
        for chunk in client.stream("Hello"): ...

Why one socket and a reader task: many concurrent requests share the connection; replies
are routed to the waiting request by req_id (a uuid the client picks). Every request has a
timeout (sent to the server as `timeout_s`, and enforced locally: on expiry the client sends
Cancel and raises `Timeout`), so no call can hang on a dead server. Server errors arrive as
`Error(code, message)` and are raised as the matching `common.errors` exception.
A stream deduplicates by token index, so a server that re-runs a request after a worker loss
and resends tokens the client already has still yields each token exactly once.
When the connection to the coordinator drops (it died or restarted: a restarted coordinator has
an empty request table), every request in flight fails at once with `CoordinatorLost` instead
of waiting for its timeout; the socket reconnects by itself, so the caller can retry on the
same client (docs/mesh.md, "Coordinator restart").
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence
from typing import Any, TypeVar

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from common import protocol as P
from common.errors import (
    AuthenticationFailed,
    Cancelled,
    CoordinatorLost,
    ProtocolError,
    Timeout,
    error_from_code,
)
from common.sockets import (
    ENV_COORDINATOR_ENDPOINT,
    CurveKeys,
    arecv_msg,
    asend_msg,
    check_endpoint,
    endpoint_from_env,
    load_curve_client,
    make_socket,
    read_public_key,
)

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 600.0
ENV_CURVE_SERVER_PUBLIC = "EXEGPT_CURVE_SERVER_PUBLIC"
ENV_CURVE_CLIENT_KEY = "EXEGPT_CURVE_CLIENT_KEY"
HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
CONNECTION_EVENTS = HANDSHAKE_EVENTS | zmq.EVENT_DISCONNECTED
_HANDSHAKE_WHY = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "this client's public key is not on its allow-list "
                                     "(authentication failed)",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "security mismatch",
}
_HANDSHAKE_HINT = ("; a CURVE server needs server_public_key= and client_keys= (CLI: "
                   "--server-key/--client-key), a plain server refuses CURVE clients")


def curve_client_keys(server_public_key: str | None,
                      client_keys: str | tuple[str, str] | None) -> CurveKeys | None:
    """CURVE client keys from SDK arguments or the environment; None: plain connection."""
    server_public_key = server_public_key or os.environ.get(ENV_CURVE_SERVER_PUBLIC) or None
    client_keys = client_keys or os.environ.get(ENV_CURVE_CLIENT_KEY) or None
    if server_public_key is None and client_keys is None:
        return None
    if server_public_key is None or client_keys is None:
        raise ValueError("CURVE needs both server_public_key (the server.key file or its "
                         "40-character key) and client_keys (this client's .key_secret file)")
    if isinstance(client_keys, str):
        return load_curve_client(client_keys, server_public_key)
    public, secret = client_keys
    return CurveKeys(public=public, secret=secret,
                     server_public=read_public_key(server_public_key))
_CLOSED = object()


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
            self._reader = loop.create_task(self._read_forever())
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
        for queue in self._pending.values():
            queue.put_nowait(Cancelled("client closed"))
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
                    continue
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    if self._connected:
                        self._connected = False
                        self._connection_lost()
                    continue
                self._auth_error = AuthenticationFailed(
                    f"the server at {self.endpoint} refused the connection: "
                    f"{_HANDSHAKE_WHY.get(event['event'], 'the handshake failed')} "
                    f"(zmq event {int(event['event'])}, value {int(event['value'])})"
                    + ("" if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH
                       else _HANDSHAKE_HINT))
                self._refused.set()
                for queue in self._pending.values():
                    queue.put_nowait(self._auth_error)
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
        if self._sock is not None:
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
            msg = await _get(queue, deadline, req_id)
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
        """Best-effort (Cancel): never blocks; a full or refused connection drops it."""
        if self._sock is not None:
            sync = zmq.Socket.shadow(self._sock.underlying)  # a plain send, no future
            with contextlib.suppress(zmq.ZMQError):
                sync.send_multipart(P.encode(msg), zmq.NOBLOCK, copy=False)

    def _register(self, req_id: str) -> asyncio.Queue[Any]:
        self._ensure_started()
        if self._auth_error is not None:
            raise self._auth_error
        if req_id in self._pending:
            raise ValueError(f"req_id {req_id!r} is already in flight on this client")
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._pending[req_id] = queue
        return queue


def submit_message(
    prompt: str | None = None,
    *,
    prompt_ids: Sequence[int] | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    chat: bool = False,
    timeout_s: float | None = None,
    req_id: str | None = None,
    stream: bool = True,
) -> P.Submit:
    """The Submit for these arguments (ValueError names a bad one before anything is sent)."""
    sampling = P.Sampling(temperature, top_k, top_p, seed, tuple(stop_token_ids), ignore_eos)
    return P.Submit(req_id or uuid.uuid4().hex, prompt,
                    None if prompt_ids is None else tuple(prompt_ids), max_new_tokens,
                    sampling, stream, timeout_s, chat)


async def _get(queue: asyncio.Queue[Any], deadline: float | None, req_id: str) -> Any:
    remaining = None if deadline is None else deadline - time.monotonic()
    if remaining is not None and remaining <= 0:
        raise Timeout("no answer before the request's timeout", req_id=req_id)
    try:
        item = await asyncio.wait_for(queue.get(), remaining)
    except TimeoutError:
        raise Timeout("no answer before the request's timeout", req_id=req_id) from None
    if isinstance(item, BaseException):
        raise item
    if isinstance(item, P.Error):
        raise error_from_code(item.code, item.message, req_id=item.req_id,
                              retry_after_s=item.retry_after_s)
    return item


class AsyncStream:
    """One in-flight request: async-iterate for StreamChunks; `.result` is set at the end.

    The request is sent on `async with` entry or the first iteration; leaving `async with`
    (or calling `aclose`) before the end cancels it.
    """

    def __init__(self, client: AsyncClient, submit: P.Submit) -> None:
        self.client, self.submit, self.req_id = client, submit, submit.req_id
        self.result: P.Result | None = None
        self._num_tokens = 0
        self._queue: asyncio.Queue[Any] | None = None
        self._deadline: float | None = None
        self._done = False

    async def __aenter__(self) -> AsyncStream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncIterator[P.StreamChunk]:
        return self._chunks()

    async def start(self) -> None:
        """Send the request now (otherwise the first iteration sends it)."""
        if self._queue is not None:
            return
        timeout = self.submit.timeout_s or self.client.default_timeout_s
        if self.submit.timeout_s is None and timeout is not None:
            self.submit = dataclasses.replace(self.submit, timeout_s=timeout)
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._queue = self.client._register(self.req_id)  # noqa: SLF001
        await self.client._send(self.submit, self._deadline, self.req_id)  # noqa: SLF001

    async def _chunks(self) -> AsyncIterator[P.StreamChunk]:
        await self.start()
        try:
            while not self._done:
                msg = await _get(self._queue, self._deadline, self.req_id)  # type: ignore[arg-type]
                chunk = self._accept(msg)
                if chunk is not None and chunk.tokens:
                    yield chunk
        finally:
            await self.aclose()

    def _accept(self, msg: P.Message) -> P.StreamChunk | None:
        """New tokens of a chunk or of the final Result (deduplicated by index)."""
        if isinstance(msg, P.StreamChunk):
            return self._new_tokens(msg.index, msg.tokens, msg.text)
        if isinstance(msg, P.Result):
            self.result, self._done = msg, True
            if msg.finish_reason == "cancelled":
                raise Cancelled("cancelled by the server", req_id=self.req_id)
            return self._new_tokens(0, msg.tokens, None)
        raise ProtocolError(f"unexpected {type(msg).__name__} for request {self.req_id}")

    def _new_tokens(self, index: int, tokens: tuple[int, ...], text: str | None) -> P.StreamChunk:
        if index > self._num_tokens:
            raise ProtocolError(
                f"stream gap for {self.req_id}: have {self._num_tokens} tokens, got index {index}"
            )
        fresh = tokens[self._num_tokens - index:]
        chunk = P.StreamChunk(self.req_id, self._num_tokens, fresh, text if fresh else None)
        self._num_tokens += len(fresh)
        return chunk

    async def aclose(self) -> None:
        if self.client._pending.pop(self.req_id, None) is None:  # noqa: SLF001
            return
        if not self._done and self.client._sock is not None:  # noqa: SLF001
            self.client._send_nowait(P.Cancel(self.req_id, "client gave up"))  # noqa: SLF001
        self._done = True


class Client:
    """Blocking client: an AsyncClient driven by a private event-loop thread (thread-safe)."""

    def __init__(self, endpoint: str | None = None, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="exegpt-client")
        self._thread.start()
        self._async = AsyncClient(endpoint, **kwargs)
        self.endpoint = self._async.endpoint

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, aw: Awaitable[T]) -> T:
        async def wrapped() -> T:
            return await aw

        return asyncio.run_coroutine_threadsafe(wrapped(), self._loop).result()

    def generate(self, prompt: str | None = None, **kwargs: Any) -> P.Result:
        return self._run(self._async.generate(prompt, **kwargs))

    def stream(self, prompt: str | None = None, **kwargs: Any) -> Stream:
        """Iterate the returned Stream for StreamChunks; `.result` is set at the end."""
        return Stream(self, self._async.stream(prompt, **kwargs))

    def cancel(self, req_id: str) -> None:
        self._run(self._async.cancel(req_id))

    def stats(self, *, include_requests: bool = False, timeout_s: float = 10.0) -> P.Stats:
        """See :meth:`AsyncClient.stats`: ``.stats`` the dict, ``.requests`` the lifecycles."""
        return self._run(self._async.stats(include_requests=include_requests,
                                           timeout_s=timeout_s))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._async.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


class Stream:
    """Blocking view of an AsyncStream; closing it (or leaving `with`) early cancels."""

    def __init__(self, client: Client, astream: AsyncStream) -> None:
        self._client, self._astream = client, astream
        self._chunks: Any = astream.__aiter__()
        self.req_id = astream.req_id
        client._run(astream.start())  # noqa: SLF001

    @property
    def result(self) -> P.Result | None:
        return self._astream.result

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[P.StreamChunk]:
        return self

    def __next__(self) -> P.StreamChunk:
        try:
            return self._client._run(self._chunks.__anext__())  # noqa: SLF001
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        self._client._run(self._chunks.aclose())  # noqa: SLF001
        self._client._run(self._astream.aclose())  # noqa: SLF001
