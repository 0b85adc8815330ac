"""CURVE authentication for the coordinator's ports: a ZAP handler and a refusal log.

    client DEALER (CURVE keys) --handshake--> ROUTER (curve_server, ZAP domain "clients")
                                                  |  libzmq asks the ZAP handler
                                                  v
                               ThreadAuthenticator (its own thread) --> AllowList.callback
                                                                        (key in allow dir?)

Why a thread authenticator: the coordinator's loop is asyncio over a plain ``zmq.Context``
(FDs watched with ``add_reader``), so ``zmq.auth.asyncio`` (which needs a ``zmq.asyncio``
context) does not fit; the thread answers ZAP requests on an inproc socket of the same context
and never touches the loop. A peer without keys fails before ZAP (mechanism mismatch), so a
socket monitor (one more thread) logs both kinds of refusal. The allow-list directory is
re-read when it changes: adding a client is copying its ``.key`` file there.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import zmq
import zmq.auth.thread
from zmq.utils.monitor import recv_monitor_message

from common.sockets import CurveKeys, load_allow_list, load_curve_server

CLIENT_DOMAIN = "clients"
WORKER_DOMAIN = "workers"
_REFUSALS = {zmq.EVENT_HANDSHAKE_FAILED_AUTH: "key not on the allow-list",
             zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "no CURVE keys (or a protocol mismatch)",
             zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed (no CURVE keys, or the "
                                                   "peer hung up mid-handshake)"}


class AllowList:
    """ZAP credentials provider: admits the public keys found in one directory."""

    def __init__(self, directory: str, log: Any, port: str) -> None:
        self.directory, self.log, self.port = directory, log, port
        self._mtime = -1.0
        self._keys: frozenset[str] = frozenset()
        self.refused = 0
        self._reload()

    def _reload(self) -> None:
        mtime = os.stat(self.directory).st_mtime
        if mtime != self._mtime:
            self._keys, self._mtime = load_allow_list(self.directory), mtime
            self.log.info("curve_allow_list", port=self.port, directory=self.directory,
                          keys=len(self._keys))

    def callback(self, domain: str, key: bytes) -> bool:
        """Called on the authenticator thread for every CURVE handshake."""
        try:
            self._reload()
        except OSError as exc:  # the directory vanished: keep the last list, say so
            self.log.error("curve_allow_list_unreadable", directory=self.directory, error=str(exc))
        allowed = key.decode() in self._keys
        if not allowed:
            self.refused += 1
            self.log.warning("auth_refused", port=self.port, client_key=key.decode(),
                             why="key not on the allow-list")
        return allowed


class HandshakeLog(threading.Thread):
    """Logs failed handshakes on one socket (reads its monitor socket on its own thread)."""

    def __init__(self, sock: zmq.Socket, log: Any, port: str) -> None:
        super().__init__(daemon=True, name=f"exegpt-auth-{port}")
        events = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                  | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self._monitor = sock.get_monitor_socket(events)
        self._sock, self.log, self.port = sock, log, port
        self._stop = threading.Event()
        self.failures = 0

    def run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._monitor.poll(200):
                    continue
                event = recv_monitor_message(self._monitor)
                self.failures += 1
                if event["event"] != zmq.EVENT_HANDSHAKE_FAILED_AUTH:  # ZAP logged those
                    self.log.warning("auth_refused", port=self.port,
                                     peer=event["endpoint"].decode(errors="replace"),
                                     why=_REFUSALS.get(event["event"], "handshake failed"),
                                     code=event["value"])
        finally:
            self._monitor.close(linger=0)

    def stop(self) -> None:
        """Call from the thread that owns the watched socket, before closing it."""
        self._sock.disable_monitor()
        self._stop.set()
        self.join(timeout=2)


class CurveGate:
    """Everything CURVE on the coordinator: keys, the ZAP thread, the refusal logs.

    ``start()`` before binding the sockets; ``watch(sock, port)`` after; ``stop()`` before
    closing them and terminating the context.
    """

    def __init__(self, ctx: zmq.Context, log: Any, server_key_file: str,
                 allow: dict[str, str]) -> None:
        self.keys: CurveKeys = load_curve_server(server_key_file)
        self.log = log
        self._auth = zmq.auth.thread.ThreadAuthenticator(ctx)
        self.allow = {domain: AllowList(directory, log, domain)
                      for domain, directory in allow.items()}
        self._watchers: list[HandshakeLog] = []

    def start(self) -> None:
        self._auth.start()
        for domain, provider in self.allow.items():
            self._auth.configure_curve_callback(domain=domain, credentials_provider=provider)
        self.log.info("curve_enabled", server_public_key=self.keys.public,
                      ports=sorted(self.allow))

    def watch(self, sock: zmq.Socket, port: str) -> None:
        watcher = HandshakeLog(sock, self.log, port)
        watcher.start()
        self._watchers.append(watcher)

    def stop(self) -> None:
        for watcher in self._watchers:
            watcher.stop()
        self._auth.stop()


def gate_from_config(ctx: zmq.Context, log: Any, cfg: Any) -> CurveGate | None:
    """The gate the config asks for (``--curve-server-key`` + allow dirs), or None."""
    if not cfg.curve_server_key:
        return None
    allow = {}
    if cfg.curve_allow:
        allow[CLIENT_DOMAIN] = cfg.curve_allow
    if cfg.curve_worker_allow:
        allow[WORKER_DOMAIN] = cfg.curve_worker_allow
    return CurveGate(ctx, log, cfg.curve_server_key, allow)
