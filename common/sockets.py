"""The one place sockets are made, and the one way messages are sent and received.

Why: socket options (HWM, linger, timeouts, identity, size limits, CURVE) decide whether a
mesh hangs, drops or leaks under failure; setting them in one helper keeps every role
consistent. The same calls work with `zmq.Context` and `zmq.asyncio.Context`.

Topology (endpoints come from config or the environment, `ipc://` or `tcp://`):

    client DEALER  --Submit/Cancel-->     ROUTER coordinator (EXEGPT_COORDINATOR_ENDPOINT)
    worker DEALER  --Hello/Ready/...-->   ROUTER coordinator (EXEGPT_WORKER_ENDPOINT)
    encoder DEALER --KVHandoff-->         ROUTER decoder (its kv_endpoint; errors go back)

A ROUTER sees every message as [identity, type, body, tensors...]: `recv_routed` splits the
identity off, `send_routed` puts it back. DEALERs send [type, body, tensors...] (no empty
delimiter frame).
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from common.errors import ProtocolError
from common.protocol import DEFAULT_LIMITS, Limits, Message, decode, encode, peek_req_id

ENV_COORDINATOR_ENDPOINT = "EXEGPT_COORDINATOR_ENDPOINT"
"""The client-facing ROUTER of the coordinator."""
ENV_WORKER_ENDPOINT = "EXEGPT_WORKER_ENDPOINT"
"""The worker-facing ROUTER of the coordinator."""

MAX_IPC_PATH = 107  # sun_path is 108 bytes including the terminating NUL
_SOCKET_TYPES = {
    name: getattr(zmq, name)
    for name in ("ROUTER", "DEALER", "PUSH", "PULL", "PUB", "SUB", "PAIR", "REQ", "REP")
}
_TCP = re.compile(r"^tcp://(\[[0-9a-fA-F:.]+\]|[^:/\s]+):(\d{1,5}|\*)$")


@dataclass(frozen=True)
class CurveKeys:
    """CURVE keys (z85 text). Server side: public+secret; client side: also server_public."""

    public: str
    secret: str
    server_public: str | None = None

    def __post_init__(self) -> None:
        for name in ("public", "secret", "server_public"):
            key = getattr(self, name)
            if key is not None and len(key) != 40:
                raise ValueError(f"CURVE {name} key must be 40 z85 characters (exegpt keys)")


def check_endpoint(endpoint: str) -> str:
    """Validate an endpoint string; returns it unchanged or raises ValueError saying why."""
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        if not path or len(path.encode()) > MAX_IPC_PATH:
            raise ValueError(
                f"ipc path {path!r} must be 1..{MAX_IPC_PATH} bytes (a unix socket limit); "
                "use a shorter directory such as /tmp/exegpt-<run>"
            )
        return endpoint
    if endpoint.startswith("tcp://"):
        m = _TCP.match(endpoint)
        if not m or (m.group(2) != "*" and not 0 <= int(m.group(2)) <= 65535):
            raise ValueError(f"tcp endpoint {endpoint!r} must look like tcp://HOST:PORT")
        return endpoint
    if endpoint.startswith("inproc://") and len(endpoint) > len("inproc://"):
        return endpoint
    raise ValueError(f"endpoint {endpoint!r} must start with ipc://, tcp:// or inproc://")


def endpoint_from_env(var: str, default: str | None = None) -> str:
    """An endpoint from the environment (what docker-compose sets), else the default."""
    value = os.environ.get(var) or default
    if not value:
        raise ValueError(f"no endpoint: set {var} (e.g. tcp://coordinator:5555 or ipc:///tmp/x)")
    return check_endpoint(value)


def make_socket(
    ctx: zmq.Context,
    kind: str,
    *,
    bind: str | None = None,
    connect: str | Sequence[str] | None = None,
    identity: bytes | str | None = None,
    hwm: int = 10_000,
    linger_ms: int = 0,
    sndtimeo_ms: int | None = None,
    rcvtimeo_ms: int | None = None,
    max_msg_bytes: int | None = None,
    router_mandatory: bool = False,
    curve_server: CurveKeys | None = None,
    curve_client: CurveKeys | None = None,
    zap_domain: str | None = None,
) -> zmq.Socket:
    """Create, configure and bind/connect a socket (works for sync and asyncio contexts).

    `hwm` bounds queued messages per peer in each direction (0 = unbounded, avoid);
    `linger_ms` = how long close() may wait to flush (0: never hang at exit); `max_msg_bytes`
    makes libzmq drop a peer that sends a bigger message before we allocate it.
    `curve_server` makes the socket a CURVE server; which clients it admits is decided by the
    ZAP handler serving `zap_domain` (`coordinator/auth.py`); `curve_client` makes it a client.
    """
    sock_type = _SOCKET_TYPES.get(kind.upper())
    if sock_type is None:
        raise ValueError(f"socket kind {kind!r} must be one of {sorted(_SOCKET_TYPES)}")
    if (bind is None) == (connect is None):
        raise ValueError("give exactly one of bind= or connect=")
    sock = ctx.socket(sock_type)
    try:
        _configure(sock, identity, hwm, linger_ms, sndtimeo_ms, rcvtimeo_ms, max_msg_bytes)
        if router_mandatory and sock_type == zmq.ROUTER:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        _apply_curve(sock, curve_server, curve_client)
        if zap_domain is not None:
            sock.setsockopt(zmq.ZAP_DOMAIN, zap_domain.encode())
        if bind is not None:
            _bind(sock, bind)
        else:
            for ep in [connect] if isinstance(connect, str) else list(connect or ()):
                sock.connect(check_endpoint(ep))
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


def _configure(
    sock: zmq.Socket,
    identity: bytes | str | None,
    hwm: int,
    linger_ms: int,
    sndtimeo_ms: int | None,
    rcvtimeo_ms: int | None,
    max_msg_bytes: int | None,
) -> None:
    if identity is not None:
        ident = identity.encode() if isinstance(identity, str) else identity
        if not 0 < len(ident) <= 255 or ident[0] == 0:
            raise ValueError("identity must be 1..255 bytes and not start with a zero byte")
        sock.setsockopt(zmq.IDENTITY, ident)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.LINGER, linger_ms)
    if sndtimeo_ms is not None:
        sock.setsockopt(zmq.SNDTIMEO, sndtimeo_ms)
    if rcvtimeo_ms is not None:
        sock.setsockopt(zmq.RCVTIMEO, rcvtimeo_ms)
    if max_msg_bytes is not None:
        sock.setsockopt(zmq.MAXMSGSIZE, max_msg_bytes)


def _apply_curve(sock: zmq.Socket, server: CurveKeys | None, client: CurveKeys | None) -> None:
    if server is not None and client is not None:
        raise ValueError("a socket is either a CURVE server or a CURVE client, not both")
    if server is not None:
        sock.curve_secretkey = server.secret.encode()
        sock.curve_publickey = server.public.encode()
        sock.curve_server = True
    if client is not None:
        if client.server_public is None:
            raise ValueError("a CURVE client needs the server's public key")
        sock.curve_serverkey = client.server_public.encode()
        sock.curve_publickey = client.public.encode()
        sock.curve_secretkey = client.secret.encode()


def read_public_key(source: str) -> str:
    """A z85 public key given as the key itself (40 characters) or as a key file path."""
    if len(source) == 40 and not os.path.exists(source):
        return source
    try:
        public, _ = zmq.auth.load_certificate(source)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read a CURVE public key from {source!r}: {exc} (give the "
                         "server.key file `exegpt keys` wrote, or the 40-character key)") from exc
    return public.decode()


def load_curve_server(secret_file: str) -> CurveKeys:
    """The server's key pair from its ``.key_secret`` file (``exegpt keys``)."""
    public, secret = _load_pair(secret_file)
    return CurveKeys(public=public, secret=secret)


def load_curve_client(secret_file: str, server_public: str) -> CurveKeys:
    """A client's key pair (its ``.key_secret`` file) plus the server's public key (text or
    file), ready for ``make_socket(curve_client=...)``."""
    public, secret = _load_pair(secret_file)
    return CurveKeys(public=public, secret=secret, server_public=read_public_key(server_public))


def _load_pair(secret_file: str) -> tuple[str, str]:
    try:
        public, secret = zmq.auth.load_certificate(secret_file)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read CURVE keys from {secret_file!r}: {exc}") from exc
    if secret is None:
        raise ValueError(f"{secret_file!r} holds only a public key; give the .key_secret file")
    return public.decode(), secret.decode()


def load_allow_list(directory: str) -> frozenset[str]:
    """The z85 public keys of every ``*.key`` file in ``directory`` (a CURVE allow-list)."""
    if not os.path.isdir(directory):
        raise ValueError(f"CURVE allow-list {directory!r} is not a directory")
    return frozenset(k.decode() for k in zmq.auth.load_certificates(directory))


def _bind(sock: zmq.Socket, endpoint: str) -> None:
    check_endpoint(endpoint)
    if endpoint.startswith("ipc://"):
        path = Path(endpoint[len("ipc://"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_socket():
            # libzmq would silently unlink the file and steal the endpoint from a live server
            if _ipc_in_use(path):
                raise OSError(f"cannot bind {endpoint}: another process is serving on it")
            path.unlink()  # a stale socket file left by a dead run
    if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
        endpoint = endpoint[:-1] + "*"
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        raise OSError(f"cannot bind {endpoint}: {exc} (is another server running?)") from exc


def _ipc_in_use(path: Path) -> bool:
    """True if a live process accepts connections on this unix socket."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def bound_endpoint(sock: zmq.Socket) -> str:
    """The real endpoint after binding (resolves tcp://host:* / :0 to the chosen port)."""
    return sock.getsockopt(zmq.LAST_ENDPOINT).decode()


# ---------------------------------------------------------------- messages over sockets


def send_msg(sock: zmq.Socket, msg: Message, *, flags: int = 0) -> Any:
    """Encode and send (copy=False: tensor frames go out from the tensors' own memory).

    On an asyncio socket this returns an awaitable; prefer `asend_msg` there.
    """
    return sock.send_multipart(encode(msg), flags=flags, copy=False)


def send_routed(sock: zmq.Socket, identity: bytes, msg: Message, *, flags: int = 0) -> Any:
    """ROUTER side: send to the peer with this identity."""
    return sock.send_multipart([identity, *encode(msg)], flags=flags, copy=False)


def recv_msg(sock: zmq.Socket, *, flags: int = 0, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Receive one message (zero-copy frames) and decode it; ProtocolError if malformed."""
    return _decode_frames(sock.recv_multipart(flags=flags, copy=False), 0, limits)[1]


def recv_routed(
    sock: zmq.Socket, *, flags: int = 0, limits: Limits = DEFAULT_LIMITS
) -> tuple[bytes, Message]:
    """ROUTER side: (sender identity, message). A ProtocolError carries the identity in
    `.envelope` (and `.req_id` when readable) so the caller can answer with an Error."""
    envelope, msg = _decode_frames(sock.recv_multipart(flags=flags, copy=False), 1, limits)
    return envelope[0], msg


async def asend_msg(sock: Any, msg: Message) -> None:
    await sock.send_multipart(encode(msg), copy=False)


async def asend_routed(sock: Any, identity: bytes, msg: Message) -> None:
    await sock.send_multipart([identity, *encode(msg)], copy=False)


async def arecv_msg(sock: Any, *, limits: Limits = DEFAULT_LIMITS) -> Message:
    frames = await sock.recv_multipart(copy=False)
    return _decode_frames(frames, 0, limits)[1]


async def arecv_routed(sock: Any, *, limits: Limits = DEFAULT_LIMITS) -> tuple[bytes, Message]:
    frames = await sock.recv_multipart(copy=False)
    envelope, msg = _decode_frames(frames, 1, limits)
    return envelope[0], msg


def _decode_frames(
    frames: list[Any], num_envelope: int, limits: Limits
) -> tuple[list[bytes], Message]:
    envelope = [f.bytes if hasattr(f, "bytes") else bytes(f) for f in frames[:num_envelope]]
    if len(envelope) < num_envelope:
        raise ProtocolError("message has no routing envelope", envelope=envelope)
    body_frames = frames[num_envelope:]
    try:
        return envelope, decode(body_frames, limits)
    except ProtocolError as exc:
        req_id = peek_req_id(body_frames) if len(body_frames) >= 2 else None
        raise ProtocolError(str(exc), envelope=envelope, req_id=req_id) from None
