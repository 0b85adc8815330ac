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

The parts: client_async.py (AsyncClient: socket, reader, connection watcher),
client_stream.py (Submit arguments, AsyncStream), client_sync.py (Client, Stream),
client_keys.py (CURVE keys, handshake errors). Import them from here.
"""

from __future__ import annotations

from common.client_async import DEFAULT_TIMEOUT_S, AsyncClient
from common.client_keys import (
    CONNECTION_EVENTS,
    ENV_CURVE_CLIENT_KEY,
    ENV_CURVE_SERVER_PUBLIC,
    HANDSHAKE_EVENTS,
    curve_client_keys,
)
from common.client_stream import AsyncStream, submit_message
from common.client_sync import Client, Stream

__all__ = [
    "CONNECTION_EVENTS",
    "DEFAULT_TIMEOUT_S",
    "ENV_CURVE_CLIENT_KEY",
    "ENV_CURVE_SERVER_PUBLIC",
    "HANDSHAKE_EVENTS",
    "AsyncClient",
    "AsyncStream",
    "Client",
    "Stream",
    "curve_client_keys",
    "submit_message",
]
