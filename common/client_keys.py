"""The SDK's connection security: CURVE keys from arguments or the environment, and the
readable error for a handshake the server refused (libzmq only reports it as a monitor event)."""

from __future__ import annotations

import os

import zmq

from common.errors import AuthenticationFailed
from common.sockets import CurveKeys, load_curve_client, read_public_key

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


def handshake_refused(endpoint: str, event: int, value: int) -> AuthenticationFailed:
    """The error every waiting request gets when the server refuses this client's handshake
    (it cannot answer a peer it did not authenticate, so there is no reply to wait for)."""
    return AuthenticationFailed(
        f"the server at {endpoint} refused the connection: "
        f"{_HANDSHAKE_WHY.get(event, 'the handshake failed')} "
        f"(zmq event {int(event)}, value {int(value)})"
        + ("" if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH else _HANDSHAKE_HINT))
