"""CURVE on the workers' KV endpoints (encoder -> decoder KV, stage -> stage passes).

    encoder DEALER (mesh pair as client keys) --CURVE--> decoder ROUTER (mesh pair as server
                                                          keys; ZAP domain "mesh": admits only
                                                          the mesh public key)

Why one shared mesh pair (``keys/mesh.key_secret`` from ``exegpt keys --workers N``): a KV
endpoint's server key must be known to every peer before the coordinator names that peer, and
the Assign's peer table carries endpoints only; a pair every worker holds needs no new wire
field. Admitting only the mesh public key as a *client* key authenticates too: CURVE proves
the client holds the matching secret, so only holders of ``mesh.key_secret`` reach a KV port.

The ZAP handler is a ``zmq.auth`` thread per context (libzmq allows one ZAP endpoint per
context); in-process tests run several links on ``zmq.Context.instance()``, so the handler is
shared and admits the union of their mesh keys.
"""

from __future__ import annotations

import threading
from typing import Any

import zmq
import zmq.auth.thread

from common.sockets import CurveKeys, load_curve_server

MESH_DOMAIN = "mesh"


class _MeshAllow:
    """ZAP credentials provider of one context: the mesh public keys its links hold."""

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self.logs: list[Any] = []
        self.refused = 0

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = key.decode() in self.keys
        if not allowed:
            self.refused += 1
            for log in self.logs[-1:]:  # rate: one refusal per handshake attempt
                log.warning("kv_auth_refused", client_key=key.decode(),
                            why="not the mesh key (keys/mesh.key_secret)")
        return allowed


_lock = threading.Lock()
_gates: dict[int, tuple[zmq.auth.thread.ThreadAuthenticator, _MeshAllow]] = {}


def _gate(ctx: zmq.Context, keys: CurveKeys, log: Any) -> _MeshAllow:
    with _lock:
        entry = _gates.get(id(ctx))
        if entry is None:
            auth = zmq.auth.thread.ThreadAuthenticator(ctx)
            auth.start()
            allow = _MeshAllow()
            auth.configure_curve_callback(domain=MESH_DOMAIN, credentials_provider=allow)
            entry = _gates[id(ctx)] = (auth, allow)
        entry[1].keys.add(keys.public)
        entry[1].logs.append(log)
        return entry[1]


def kv_server_options(ctx: zmq.Context, mesh_key_file: str | None,
                      log: Any) -> dict[str, Any]:
    """``make_socket`` options for a KV ROUTER: CURVE server + ZAP, or none without a key."""
    if not mesh_key_file:
        return {}
    keys = load_curve_server(mesh_key_file)
    _gate(ctx, keys, log)
    log.info("kv_curve_enabled", mesh_public_key=keys.public)
    return {"curve_server": keys, "zap_domain": MESH_DOMAIN}


def kv_client_keys(mesh_key_file: str | None) -> CurveKeys | None:
    """The CURVE client keys of a KV DEALER (the mesh pair, towards the mesh public key)."""
    if not mesh_key_file:
        return None
    keys = load_curve_server(mesh_key_file)
    return CurveKeys(public=keys.public, secret=keys.secret, server_public=keys.public)
