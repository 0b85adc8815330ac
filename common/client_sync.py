"""The blocking SDK: `Client` drives an AsyncClient on a private event-loop thread, so many
threads can share one connection (each call is a coroutine run on that loop)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

from common import protocol as P
from common.client_async import AsyncClient
from common.client_stream import AsyncStream

T = TypeVar("T")


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
