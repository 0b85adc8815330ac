"""Typed errors shared by the SDK, the coordinator and the workers.

Why one module: the server turns a failure into an `Error` wire message carrying a string
`code`; the SDK turns that code back into the same exception class. Both sides therefore need
one table from code to class, and that table lives here (torch-free, zmq-free).

    ExegptError
    +-- ProtocolError            a malformed message (bad bytes on the wire)
    +-- ServerError              the server answered with an error for a request
        +-- BadRequest           the request itself is invalid (prompt too long, bad params)
        +-- Overloaded           queues are full; retry after `retry_after_s`
        +-- Timeout              the request's deadline passed (client or server side)
        +-- Cancelled            the request was cancelled
        +-- WorkerLost           a worker holding the request died and it could not be re-run
        +-- ShuttingDown         the server is stopping and no longer takes work
        +-- Unavailable          no worker of a needed role is available
        |   +-- CoordinatorLost  the connection to the coordinator dropped mid-request (SDK)
        +-- InternalError        a bug or unexpected failure on the server
        +-- AuthenticationFailed the server refused this client's CURVE keys (or their absence)
"""

from __future__ import annotations

from typing import ClassVar


class ExegptError(Exception):
    """Base of every exegpt error, so callers can catch the family in one clause."""


class ProtocolError(ExegptError):
    """A message could not be decoded (or encoded): the text names the field and the problem.

    `envelope` holds the routing frames of the offending message (ROUTER identity) when the
    socket helper received it, and `req_id` the request id when it could still be read, so
    the receiver can answer the sender with an `Error` instead of dropping it silently.
    """

    code: ClassVar[str] = "protocol_error"

    def __init__(
        self, message: str, *, envelope: list[bytes] | None = None, req_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.envelope = envelope or []
        self.req_id = req_id


class ServerError(ExegptError):
    """An error the server reported for a request (or a client-side deadline for one).

    `code` is the wire code (see `ERROR_CODES`); `message` is the server's text verbatim.
    """

    code: ClassVar[str] = "internal"

    def __init__(
        self, message: str, *, req_id: str | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.req_id = req_id
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        where = f" [req_id={self.req_id}]" if self.req_id else ""
        retry = f" (retry after {self.retry_after_s:g}s)" if self.retry_after_s is not None else ""
        return f"{self.code}: {self.message}{where}{retry}"


class BadRequest(ServerError):
    code = "bad_request"


class Overloaded(ServerError):
    code = "overloaded"


class Timeout(ServerError):
    code = "timeout"


class Cancelled(ServerError):
    code = "cancelled"


class WorkerLost(ServerError):
    code = "worker_lost"


class ShuttingDown(ServerError):
    code = "shutting_down"


class Unavailable(ServerError):
    code = "unavailable"


class CoordinatorLost(Unavailable):
    """The SDK lost its connection to the coordinator while the request was in flight (the
    coordinator died or restarted). A restarted coordinator does not know the request: retry
    it (a new ``req_id``; the SDK picks one per call). Raised by the SDK from its socket's
    connection events, never sent on the wire (the code stays ``unavailable``)."""


class InternalError(ServerError):
    code = "internal"


class AuthenticationFailed(ServerError):
    """The CURVE handshake failed: no keys, a key not on the server's allow-list, or the wrong
    server key. Raised by the SDK from its socket's handshake events (the server never gets
    to answer an unauthenticated peer)."""

    code = "unauthenticated"


class RemoteProtocolError(ServerError):
    """The peer could not decode a message we sent (it answered with code `protocol_error`)."""

    code = "protocol_error"


_CLASSES: tuple[type[ServerError], ...] = (
    BadRequest,
    Overloaded,
    Timeout,
    Cancelled,
    WorkerLost,
    ShuttingDown,
    Unavailable,
    InternalError,
    RemoteProtocolError,
    AuthenticationFailed,
)

ERROR_CODES: dict[str, type[ServerError]] = {cls.code: cls for cls in _CLASSES}
"""Every code an `Error` message may carry, mapped to the exception the SDK raises for it."""


def error_from_code(
    code: str, message: str, *, req_id: str | None = None, retry_after_s: float | None = None
) -> ServerError:
    """Build the typed exception for a wire error code (unknown codes become InternalError)."""
    cls = ERROR_CODES.get(code, InternalError)
    if cls is InternalError and code != InternalError.code:
        message = f"(unknown error code {code!r}) {message}"
    return cls(message, req_id=req_id, retry_after_s=retry_after_s)
