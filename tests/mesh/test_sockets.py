"""The socket helper: options, endpoints, and messages over real sync and asyncio sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.asyncio

from common import protocol as P
from common.errors import ProtocolError
from common.sockets import (
    arecv_msg,
    arecv_routed,
    asend_msg,
    asend_routed,
    bound_endpoint,
    check_endpoint,
    endpoint_from_env,
    make_socket,
    recv_msg,
    recv_routed,
    send_msg,
    send_routed,
)


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def _endpoints(tmp_path: Path) -> list[str]:
    return [f"ipc://{tmp_path}/s.sock", "tcp://127.0.0.1:0"]


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_router_dealer_round_trip(ctx: zmq.Context, tmp_path: Path, transport: str) -> None:
    ep = _endpoints(tmp_path)[0 if transport == "ipc" else 1]
    router = make_socket(ctx, "ROUTER", bind=ep, rcvtimeo_ms=5000)
    dealer = make_socket(ctx, "DEALER", connect=bound_endpoint(router), identity="client-1",
                         rcvtimeo_ms=5000)
    send_msg(dealer, P.Submit("r1", prompt="hi"))
    who, msg = recv_routed(router)
    assert who == b"client-1" and msg == P.Submit("r1", prompt="hi")
    send_routed(router, who, P.Result("r1", (1, 2), "stop"))
    assert recv_msg(dealer) == P.Result("r1", (1, 2), "stop")


def test_malformed_message_error_carries_sender_and_req_id(ctx: zmq.Context) -> None:
    router = make_socket(ctx, "ROUTER", bind="inproc://bad", rcvtimeo_ms=5000)
    dealer = make_socket(ctx, "DEALER", connect="inproc://bad", identity=b"c9")
    frames = P.encode(P.Submit("r7", prompt="hi"))
    dealer.send_multipart([frames[0], frames[1], b"stray frame"])
    with pytest.raises(ProtocolError) as info:
        recv_routed(router)
    assert info.value.envelope == [b"c9"] and info.value.req_id == "r7"
    assert "not referenced" in str(info.value)
    send_msg(dealer, P.Cancel("r7"))  # the socket keeps working after a bad message
    assert recv_routed(router) == (b"c9", P.Cancel("r7"))


def test_push_pull_large_tensor(ctx: zmq.Context, tmp_path: Path) -> None:
    pull = make_socket(ctx, "PULL", bind=f"ipc://{tmp_path}/kv.sock", rcvtimeo_ms=5000)
    push = make_socket(ctx, "PUSH", connect=bound_endpoint(pull))
    k = np.random.default_rng(0).integers(0, 1 << 16, size=(4, 2, 512, 64), dtype=np.uint16)
    kv = P.KVPayload("r", 512, 0, 4, 0, 2, 2, {"k": k})
    send_msg(push, P.KVHandoff("r", "e", 3, 512, 8, P.Sampling(), kv))
    out = recv_msg(pull)
    assert np.array_equal(out.kv.tensors["k"].as_numpy(), k)


def test_max_msg_bytes_drops_oversized_messages(ctx: zmq.Context) -> None:
    pull = make_socket(ctx, "PULL", bind="tcp://127.0.0.1:0", max_msg_bytes=1000,
                       rcvtimeo_ms=300)
    push = make_socket(ctx, "PUSH", connect=bound_endpoint(pull))
    push.send_multipart([b"\x13", b"x" * 5000])
    with pytest.raises(zmq.Again):
        pull.recv_multipart()


def test_asyncio_sockets() -> None:
    async def main() -> tuple[bytes, P.Message, P.Message]:
        actx = zmq.asyncio.Context()
        try:
            router = make_socket(actx, "ROUTER", bind="inproc://a")
            dealer = make_socket(actx, "DEALER", connect="inproc://a", identity="d")
            await asend_msg(dealer, P.Cancel("x"))
            who, msg = await asyncio.wait_for(arecv_routed(router), 5)
            await asend_routed(router, who, P.Error("cancelled", "gone", "x"))
            reply = await asyncio.wait_for(arecv_msg(dealer), 5)
            return who, msg, reply
        finally:
            actx.destroy(linger=0)

    who, msg, reply = asyncio.run(main())
    assert who == b"d" and msg == P.Cancel("x") and reply == P.Error("cancelled", "gone", "x")


def test_stale_ipc_socket_file_is_replaced(ctx: zmq.Context, tmp_path: Path) -> None:
    import socket as pysocket

    (tmp_path / "sub").mkdir()
    leftover = pysocket.socket(pysocket.AF_UNIX)  # what a crashed server leaves behind
    leftover.bind(f"{tmp_path}/sub/c.sock")
    leftover.close()
    ep = f"ipc://{tmp_path}/sub/c.sock"
    again = make_socket(ctx, "ROUTER", bind=ep)
    assert bound_endpoint(again) == ep


def test_live_ipc_endpoint_is_not_stolen(ctx: zmq.Context, tmp_path: Path) -> None:
    ep = f"ipc://{tmp_path}/live.sock"
    live = make_socket(ctx, "ROUTER", bind=ep)
    other = zmq.Context()
    try:
        with pytest.raises(OSError, match="cannot bind"):
            make_socket(other, "ROUTER", bind=ep)
    finally:
        other.destroy(linger=0)
    assert bound_endpoint(live) == ep


def test_bind_conflict_says_why(ctx: zmq.Context) -> None:
    a = make_socket(ctx, "ROUTER", bind="tcp://127.0.0.1:0")
    with pytest.raises(OSError, match="cannot bind"):
        make_socket(ctx, "ROUTER", bind=bound_endpoint(a))


@pytest.mark.parametrize(
    "endpoint",
    ["http://x:1", "tcp://host", "tcp://host:99999", "ipc://", "ipc:///" + "x" * 200, "inproc://"],
)
def test_bad_endpoints(endpoint: str) -> None:
    with pytest.raises(ValueError):
        check_endpoint(endpoint)


@pytest.mark.parametrize(
    "endpoint", ["tcp://127.0.0.1:5555", "tcp://coordinator:5555", "tcp://[::1]:5", "tcp://*:*",
                 "ipc:///tmp/exegpt/c.sock", "inproc://x"],
)
def test_good_endpoints(endpoint: str) -> None:
    assert check_endpoint(endpoint) == endpoint


def test_endpoint_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXEGPT_COORDINATOR_ENDPOINT", "tcp://coordinator:5555")
    assert endpoint_from_env("EXEGPT_COORDINATOR_ENDPOINT") == "tcp://coordinator:5555"
    monkeypatch.delenv("EXEGPT_COORDINATOR_ENDPOINT")
    assert endpoint_from_env("EXEGPT_COORDINATOR_ENDPOINT", "ipc:///tmp/x") == "ipc:///tmp/x"
    with pytest.raises(ValueError, match="EXEGPT_COORDINATOR_ENDPOINT"):
        endpoint_from_env("EXEGPT_COORDINATOR_ENDPOINT")


def test_option_validation(ctx: zmq.Context) -> None:
    with pytest.raises(ValueError, match="socket kind"):
        make_socket(ctx, "FOO", bind="inproc://q")
    with pytest.raises(ValueError, match="exactly one"):
        make_socket(ctx, "PUSH", bind="inproc://q", connect="inproc://q")
    with pytest.raises(ValueError, match="identity"):
        make_socket(ctx, "DEALER", connect="inproc://q", identity=b"\x00abc")


def test_options_are_applied(ctx: zmq.Context) -> None:
    s = make_socket(ctx, "DEALER", connect="inproc://o", identity="w1", hwm=7, linger_ms=5,
                    sndtimeo_ms=11, rcvtimeo_ms=13, max_msg_bytes=1 << 20)
    assert s.getsockopt(zmq.IDENTITY) == b"w1"
    assert (s.getsockopt(zmq.SNDHWM), s.getsockopt(zmq.RCVHWM)) == (7, 7)
    assert s.getsockopt(zmq.LINGER) == 5
    assert (s.getsockopt(zmq.SNDTIMEO), s.getsockopt(zmq.RCVTIMEO)) == (11, 13)
    assert s.getsockopt(zmq.MAXMSGSIZE) == 1 << 20


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CURVE")
def test_curve_authenticated_pair(ctx: zmq.Context) -> None:
    from common.sockets import CurveKeys

    server_pub, server_sec = (k.decode() for k in zmq.curve_keypair())
    client_pub, client_sec = (k.decode() for k in zmq.curve_keypair())
    router = make_socket(ctx, "ROUTER", bind="tcp://127.0.0.1:0", rcvtimeo_ms=5000,
                         curve_server=CurveKeys(server_pub, server_sec))
    dealer = make_socket(ctx, "DEALER", connect=bound_endpoint(router),
                         curve_client=CurveKeys(client_pub, client_sec, server_pub))
    send_msg(dealer, P.Cancel("c"))
    assert recv_routed(router)[1] == P.Cancel("c")
