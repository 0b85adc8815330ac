"""One request on an AsyncClient: the Submit it sends and the AsyncStream that yields its
tokens, deduplicated by index (a request re-run after a worker loss resends tokens the caller
already has; each is yielded exactly once)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from common import protocol as P
from common.errors import Cancelled, ProtocolError, Timeout, error_from_code

if TYPE_CHECKING:
    from common.client_async import AsyncClient


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


async def next_reply(queue: asyncio.Queue[Any], deadline: float | None, req_id: str) -> Any:
    """The next message the reader routed to this request; errors are raised, typed."""
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
                msg = await next_reply(self._queue, self._deadline,  # type: ignore[arg-type]
                                       self.req_id)
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
        """Stop waiting; a request the server has not finished is cancelled there too."""
        reason = None if self._done else "client gave up"
        if self.client._forget(self.req_id, reason):  # noqa: SLF001
            self._done = True
