"""The SDK against a small fake coordinator (a ROUTER in a thread, speaking the protocol)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import zmq

from common import protocol as P
from common.client import AsyncClient, Client
from common.errors import Cancelled, Overloaded, ProtocolError, Timeout
from common.sockets import bound_endpoint, make_socket, recv_routed, send_routed


def expected_tokens(prompt_ids: tuple[int, ...], n: int) -> tuple[int, ...]:
    return tuple((sum(prompt_ids) + 3 * i) % 1000 for i in range(n))


class FakeServer:
    """Answers Submit like a coordinator would; special prompts trigger failure modes."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = make_socket(self.ctx, "ROUTER", bind=endpoint, rcvtimeo_ms=50)
        self.endpoint = bound_endpoint(self.sock)
        self.cancelled: list[str] = []
        self.hanging: dict[str, bytes] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close(0)
        self.ctx.term()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                who, msg = recv_routed(self.sock)
            except zmq.Again:
                continue
            if isinstance(msg, P.Submit):
                self._submit(who, msg)
            elif isinstance(msg, P.Cancel):
                self.cancelled.append(msg.req_id)
                if self.hanging.pop(msg.req_id, None) is not None:
                    send_routed(self.sock, who, P.Result(msg.req_id, (), "cancelled"))
            elif isinstance(msg, P.StatsRequest):
                send_routed(self.sock, who, P.Stats(msg.req_id, {"cancelled": len(self.cancelled)}))

    def _submit(self, who: bytes, msg: P.Submit) -> None:
        send = lambda m: send_routed(self.sock, who, m)  # noqa: E731
        if msg.prompt == "overload":
            send(P.Error("overloaded", "queue full", msg.req_id, 0.5))
        elif msg.prompt == "hang":
            self.hanging[msg.req_id] = who
        elif msg.prompt == "dup":
            for index, toks in [(0, (1, 2)), (1, (2, 3)), (0, (1,)), (3, (4,))]:
                send(P.StreamChunk(msg.req_id, index, toks))
            send(P.Result(msg.req_id, (1, 2, 3, 4), "stop"))
        elif msg.prompt == "gap":
            send(P.StreamChunk(msg.req_id, 0, (1,)))
            send(P.StreamChunk(msg.req_id, 5, (2,)))
        elif msg.prompt == "garbage":
            self.sock.send_multipart([who, b"\x99", b"junk"])
            send(P.Result(msg.req_id, (7,), "stop", "ok"))
        else:
            self._generate(send, msg)

    def _generate(self, send, msg: P.Submit) -> None:  # type: ignore[no-untyped-def]
        ids = msg.prompt_ids or tuple(msg.prompt.encode())  # type: ignore[union-attr]
        tokens = expected_tokens(ids, msg.max_new_tokens)
        t0 = time.time()
        if msg.stream:
            for i in range(0, len(tokens), 2):
                send(P.StreamChunk(msg.req_id, i, tokens[i:i + 2], f"<{i}>"))
        life = P.Lifecycle(t_arrival=t0, t_first_token=t0 + 0.001, t_finish=time.time())
        send(P.Result(msg.req_id, tokens, "length", f"n={len(tokens)}", len(ids), life))


@pytest.fixture(params=["ipc", "tcp"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FakeServer]:
    ep = f"ipc://{tmp_path}/c.sock" if request.param == "ipc" else "tcp://127.0.0.1:0"
    srv = FakeServer(ep)
    yield srv
    srv.close()


def test_sync_generate_and_stream(server: FakeServer) -> None:
    with Client(server.endpoint) as client:
        result = client.generate(prompt_ids=[5, 6], max_new_tokens=5)
        assert result.tokens == expected_tokens((5, 6), 5)
        assert result.finish_reason == "length" and result.text == "n=5"
        assert result.num_prompt_tokens == 2
        assert result.lifecycle.ttft == pytest.approx(0.001, abs=1e-6)
        with client.stream(prompt_ids=[1], max_new_tokens=5) as s:
            chunks = list(s)
        assert [c.index for c in chunks] == [0, 2, 4]
        assert sum((c.tokens for c in chunks), ()) == expected_tokens((1,), 5)
        assert s.result is not None and s.result.tokens == expected_tokens((1,), 5)


def test_many_concurrent_requests_on_one_async_client(server: FakeServer) -> None:
    async def main() -> None:
        async with AsyncClient(server.endpoint) as client:
            async def one(i: int) -> None:
                ids = (i, i + 1)
                if i % 2:
                    got = (await client.generate(prompt_ids=ids, max_new_tokens=1 + i % 7)).tokens
                else:
                    got = ()
                    async for chunk in client.stream(prompt_ids=ids, max_new_tokens=1 + i % 7):
                        got += chunk.tokens
                assert got == expected_tokens(ids, 1 + i % 7)

            await asyncio.gather(*(one(i) for i in range(300)))

    asyncio.run(main())


def test_sync_client_is_thread_safe(server: FakeServer) -> None:
    with Client(server.endpoint) as client, ThreadPoolExecutor(8) as pool:
        results = list(pool.map(
            lambda i: client.generate(prompt_ids=[i], max_new_tokens=3).tokens, range(100)))
    assert results == [expected_tokens((i,), 3) for i in range(100)]


def test_stream_deduplicates_resent_tokens(server: FakeServer) -> None:
    with Client(server.endpoint) as client:
        chunks = list(client.stream("dup"))
    assert sum((c.tokens for c in chunks), ()) == (1, 2, 3, 4)
    assert [c.index for c in chunks] == [0, 2, 3]


def test_stream_gap_is_a_protocol_error(server: FakeServer) -> None:
    with Client(server.endpoint) as client, pytest.raises(ProtocolError, match="gap"):
        list(client.stream("gap"))


def test_server_errors_are_typed(server: FakeServer) -> None:
    with Client(server.endpoint) as client, pytest.raises(Overloaded) as info:
        client.generate("overload")
    assert info.value.message == "queue full" and info.value.retry_after_s == 0.5
    assert info.value.req_id is not None and "overloaded: queue full" in str(info.value)


def test_timeout_raises_and_cancels_on_the_server(server: FakeServer) -> None:
    with Client(server.endpoint) as client:
        t0 = time.monotonic()
        with pytest.raises(Timeout):
            client.generate("hang", timeout_s=0.3, req_id="slow-1")
        assert 0.25 < time.monotonic() - t0 < 2.0
        client.stats()  # a round trip, so the Cancel has surely arrived
    assert "slow-1" in server.cancelled


def test_cancel_from_another_task(server: FakeServer) -> None:
    async def main() -> None:
        async with AsyncClient(server.endpoint) as client:
            task = asyncio.create_task(client.generate("hang", req_id="c-1"))
            await asyncio.sleep(0.1)
            await client.cancel("c-1")
            with pytest.raises(Cancelled):
                await task

    asyncio.run(main())
    deadline = time.monotonic() + 2
    while "c-1" not in server.cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "c-1" in server.cancelled


def test_leaving_a_stream_early_cancels_it(server: FakeServer) -> None:
    with Client(server.endpoint) as client:
        with client.stream("hang", req_id="early") as s:
            assert s.req_id == "early"
        stats = client.stats()
    assert "early" in server.cancelled and stats.stats["cancelled"] >= 1


def test_garbled_replies_are_skipped(server: FakeServer) -> None:
    with Client(server.endpoint) as client:
        assert client.generate("garbage").tokens == (7,)


def test_bad_arguments_fail_before_sending(server: FakeServer) -> None:
    with Client(server.endpoint) as client:
        with pytest.raises(ValueError, match="exactly one"):
            client.generate("a", prompt_ids=[1])
        with pytest.raises(ValueError, match="max_new_tokens"):
            client.generate("a", max_new_tokens=0)
        with pytest.raises(ValueError, match="top_p"):
            client.generate("a", top_p=2.0)


def test_endpoint_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXEGPT_COORDINATOR_ENDPOINT", "tcp://127.0.0.1:1")
    with Client() as client:
        assert client.endpoint == "tcp://127.0.0.1:1"
    monkeypatch.delenv("EXEGPT_COORDINATOR_ENDPOINT")
    with pytest.raises(ValueError, match="EXEGPT_COORDINATOR_ENDPOINT"):
        AsyncClient()


def test_no_server_means_timeout_not_hang(tmp_path: Path) -> None:
    with Client(f"ipc://{tmp_path}/nobody.sock") as client, pytest.raises(Timeout):
        client.generate("x", timeout_s=0.2)


def test_close_fails_waiting_requests_and_loops_are_checked(server: FakeServer) -> None:
    client = AsyncClient(server.endpoint)

    async def main() -> None:
        task = asyncio.create_task(client.generate("hang"))
        await asyncio.sleep(0.1)
        await client.close()
        with pytest.raises(Cancelled, match="client closed"):
            await task

    asyncio.run(main())
    other = AsyncClient(server.endpoint)

    async def first() -> None:
        await other.generate(prompt_ids=[1], max_new_tokens=1)

    async def second() -> None:
        with pytest.raises(RuntimeError, match="event loop"):
            await other.generate(prompt_ids=[1], max_new_tokens=1)

    asyncio.run(first())
    asyncio.run(second())
    asyncio.run(other.close())


def test_forgetting_close_does_not_hang_the_process(tmp_path: Path) -> None:
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import asyncio, gc
        from common.client import AsyncClient, Client
        from common.errors import Timeout
        a = AsyncClient("ipc://{tmp_path}/none.sock")
        async def main():
            try:
                await a.generate("x", timeout_s=0.1)
            except Timeout:
                pass
        asyncio.run(main())
        c = Client("ipc://{tmp_path}/none.sock")
        try:
            c.generate("x", timeout_s=0.1)
        except Timeout:
            pass
        del a
        gc.collect()
        print("exited")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "exited"
