"""Client-facing messages (type bytes 0x1_): requests, results, errors and stats.
Import them from common.protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from common.errors import ERROR_CODES, ProtocolError, ServerError
from common.protocol_codec import Json, Message, register
from common.protocol_values import (
    FINISH_REASONS,
    Lifecycle,
    Sampling,
    _check_id,
    _check_tokens,
)


@register
@dataclass(frozen=True)
class Submit(Message):
    """Client -> coordinator: one generation request (exactly one of prompt / prompt_ids).

    `timeout_s` counts from the server's arrival time (relative, so clocks need not agree).
    """

    TYPE: ClassVar[int] = 0x10
    req_id: str
    prompt: str | None = None
    prompt_ids: tuple[int, ...] | None = None
    max_new_tokens: int = 128
    sampling: Sampling = field(default_factory=Sampling)
    stream: bool = False
    timeout_s: float | None = None
    chat: bool = False

    def check(self) -> None:
        _check_id("req_id", self.req_id)
        if (self.prompt is None) == (self.prompt_ids is None):
            raise ValueError("give exactly one of prompt (text) or prompt_ids (token ids)")
        if self.prompt_ids is not None:
            _check_tokens("prompt_ids", self.prompt_ids)
            if not self.prompt_ids:
                raise ValueError("prompt_ids must not be empty")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")


@register
@dataclass(frozen=True)
class StreamChunk(Message):
    """Coordinator -> client: new tokens; `index` is the position of tokens[0] in the output."""

    TYPE: ClassVar[int] = 0x11
    req_id: str
    index: int
    tokens: tuple[int, ...]
    text: str | None = None

    def check(self) -> None:
        if self.index < 0:
            raise ValueError(f"index must be >= 0, got {self.index}")


@register
@dataclass(frozen=True)
class Result(Message):
    """Coordinator -> client: the whole output of a finished request."""

    TYPE: ClassVar[int] = 0x12
    req_id: str
    tokens: tuple[int, ...]
    finish_reason: str
    text: str | None = None
    num_prompt_tokens: int = 0
    lifecycle: Lifecycle = field(default_factory=Lifecycle)

    def check(self) -> None:
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}")


@register
@dataclass(frozen=True)
class Cancel(Message):
    """Client -> coordinator -> workers: stop a request and free its KV everywhere."""

    TYPE: ClassVar[int] = 0x13
    req_id: str
    reason: str = ""


@register
@dataclass(frozen=True)
class Error(Message):
    """Any direction: a failure, with a code from common.errors.ERROR_CODES."""

    TYPE: ClassVar[int] = 0x14
    code: str
    message: str
    req_id: str | None = None
    retry_after_s: float | None = None

    def check(self) -> None:
        if self.code not in ERROR_CODES:
            raise ValueError(f"unknown error code {self.code!r}; use one of {sorted(ERROR_CODES)}")


def error_for(exc: BaseException, req_id: str | None = None) -> Error:
    """The Error that reports `exc` to a peer: ProtocolError -> "protocol_error" (with the
    req_id it could still read), ServerError -> its own code, anything else -> "internal"."""
    if isinstance(exc, ProtocolError):
        return Error("protocol_error", str(exc), req_id or exc.req_id)
    if isinstance(exc, ServerError):
        return Error(exc.code, exc.message, req_id or exc.req_id, exc.retry_after_s)
    return Error("internal", f"{type(exc).__name__}: {exc}", req_id)


@register
@dataclass(frozen=True)
class StatsRequest(Message):
    """Ask for stats; the reply's req_id matches."""

    TYPE: ClassVar[int] = 0x15
    req_id: str
    include_requests: bool = False


@register
@dataclass(frozen=True)
class Stats(Message):
    """Stats (JSON-like tree) plus, on request, each finished request's lifecycle."""

    TYPE: ClassVar[int] = 0x16
    req_id: str
    stats: Json = field(default_factory=dict)
    requests: dict[str, Lifecycle] = field(default_factory=dict)
