"""The SDK's reader must not miss a reply when the client itself sends (Cancel) in between.

libzmq signals "messages waiting" on one edge-triggered FD, and ANY operation on the socket
(a send included) may consume that edge while processing the socket's command mailbox. The
race seen in test_e2e_faults (4 worker_lost errors sent, 3 never handed to their callers): the
first error wakes its caller, whose stream sends a best-effort Cancel; the other errors arrive
just before that send, whose mailbox processing eats their wake-up, and the reader slept on
until the requests' timeouts. Here the loop is blocked while the reply arrives, which makes
the interleaving deterministic.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import zmq

from common import protocol as P
from common.client import AsyncClient
from common.errors import ProtocolError, Timeout, WorkerLost
from common.sockets import bound_endpoint, make_socket, recv_routed, send_routed


def _submits(router: zmq.Socket, count: int) -> bytes:
    """Wait for ``count`` Submits on the fake server; the client's routing id."""
    who = b""
    for _ in range(count):
        who, msg = recv_routed(router)
        assert isinstance(msg, P.Submit)
    return who


def test_a_reply_arriving_just_before_a_cancel_still_wakes_the_reader() -> None:
    ctx = zmq.Context()
    router = make_socket(ctx, "ROUTER", bind="tcp://127.0.0.1:0", rcvtimeo_ms=5000)

    async def run() -> None:
        async with AsyncClient(bound_endpoint(router), default_timeout_s=3) as client:
            left = client.stream(prompt_ids=[1], max_new_tokens=4)
            waiting = client.stream(prompt_ids=[2], max_new_tokens=4)
            await left.start()
            await waiting.start()
            who = _submits(router, 2)
            await asyncio.sleep(0.2)  # the reader found nothing and sleeps on the FD
            send_routed(router, who, P.Error(code="worker_lost", message="worker dec0 lost",
                                             req_id=waiting.req_id))
            time.sleep(0.3)  # loop blocked: the reply reaches the socket, the FD is signalled
            await left.aclose()  # no await inside: its Cancel is sent before the loop polls
            t0 = time.monotonic()
            try:
                async for _ in waiting:
                    pass
            except WorkerLost:
                pass
            except Timeout as exc:  # the pre-fix behaviour: the wake-up was lost
                raise AssertionError("the reply was received but never handed over") from exc
            else:
                raise AssertionError("the stream ended without the server's error")
            assert time.monotonic() - t0 < 2

    try:
        asyncio.run(run())
    finally:
        router.close(0)
        ctx.term()


def test_a_reader_that_dies_fails_waiting_and_later_requests_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a silent hang until each request's timeout: the reader is the only route."""
    async def broken_recv(*args: object, **kwargs: object) -> P.Message:
        raise RuntimeError("boom")

    monkeypatch.setattr("common.client_async.arecv_msg", broken_recv)
    ctx = zmq.Context()
    router = make_socket(ctx, "ROUTER", bind="tcp://127.0.0.1:0", rcvtimeo_ms=5000)

    async def run() -> None:
        async with AsyncClient(bound_endpoint(router), default_timeout_s=30) as client:
            t0 = time.monotonic()
            with pytest.raises(ProtocolError, match="reply reader stopped.*boom"):
                await client.generate(prompt_ids=[1], max_new_tokens=4)
            with pytest.raises(ProtocolError, match="reply reader stopped"):
                await client.generate(prompt_ids=[2], max_new_tokens=4)
            assert time.monotonic() - t0 < 5

    try:
        asyncio.run(run())
    finally:
        router.close(0)
        ctx.term()
