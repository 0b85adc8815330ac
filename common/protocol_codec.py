"""The machinery behind `common.protocol`: typed frozen dataclasses <-> multipart frames.

Why a schema-driven codec: every message is a frozen dataclass whose type hints are the
schema, so encoding and strict decoding come from one declaration and cannot drift apart.
A message on the wire is

    frame 0   1 byte: the message type (Message.TYPE)
    frame 1   msgpack map: {"v": PROTOCOL_VERSION, <field>: <value>, ...} in field order
    frame 2.. one raw frame per large tensor (the body entry names its frame index)

Field types and their checks live in common.protocol_fields. Decoding checks everything
and raises only ProtocolError; it never evaluates or unpickles anything (msgpack extension
types are refused).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack

from common.errors import ProtocolError
from common.protocol_fields import (
    DecodeCtx,
    EncodeCtx,
    Json,
    Struct,
    Tensor,
    decode_fields,
    encode_fields,
)
from common.tensorframe import DEFAULT_INLINE_THRESHOLD

__all__ = [
    "PROTOCOL_VERSION", "Limits", "DEFAULT_LIMITS", "Struct", "Message", "Tensor", "Json",
    "register", "message_types", "encode", "decode", "peek_req_id",
]

PROTOCOL_VERSION = 4


@dataclass(frozen=True)
class Limits:
    """Bounds applied while decoding, so a hostile peer cannot make us allocate or recurse."""

    max_frames: int = 1024
    max_body_bytes: int = 16 << 20
    max_frame_bytes: int = 1 << 30
    max_str_len: int = 8 << 20
    max_bin_len: int = 1 << 20
    max_array_len: int = 1 << 20
    max_map_len: int = 1 << 16
    max_depth: int = 32
    max_ndim: int = 8

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if type(value) is not int or value <= 0:
                raise ValueError(f"Limits.{f.name} must be a positive int, got {value!r}")
        if self.max_frames < 2:
            raise ValueError("Limits.max_frames must be at least 2 (type byte and body)")


DEFAULT_LIMITS = Limits()


class Message(Struct):
    """A top-level wire message; subclasses set a unique one-byte TYPE."""

    TYPE: ClassVar[int] = -1


_REGISTRY: dict[int, type[Message]] = {}
_TYPE_BYTES = [bytes((i,)) for i in range(256)]


def register(cls: type[Message]) -> type[Message]:
    """Class decorator (after @dataclass): makes the message type known to `decode`."""
    if not 0 <= cls.TYPE <= 255:
        raise ValueError(f"{cls.__name__}.TYPE must be one byte, got {cls.TYPE}")
    if cls.TYPE in _REGISTRY:
        raise ValueError(f"type byte {cls.TYPE:#04x} used by {_REGISTRY[cls.TYPE].__name__}")
    _REGISTRY[cls.TYPE] = cls
    return cls


def message_types() -> dict[int, type[Message]]:
    return dict(_REGISTRY)


# ---------------------------------------------------------------- whole messages


def encode(msg: Message, *, inline_threshold: int = DEFAULT_INLINE_THRESHOLD) -> list[Any]:
    """Message -> multipart frames [type byte, msgpack body, tensor buffers...].

    Tensor frames are views over the tensors' own memory: send them with copy=False and do
    not modify the tensors until the send has completed.
    """
    cls = type(msg)
    if _REGISTRY.get(cls.TYPE) is not cls:
        raise ProtocolError(f"{cls.__name__} is not a registered message type")
    frames: list[Any] = []
    body = {"v": PROTOCOL_VERSION}
    body.update(encode_fields(msg, EncodeCtx(frames, inline_threshold)))
    try:
        packed = msgpack.packb(body, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"{type(msg).__name__}: cannot pack body: {exc}") from None
    return [_TYPE_BYTES[cls.TYPE], packed, *frames]


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not allowed")


def _buffer(frame: Any) -> memoryview:
    """bytes / bytearray / memoryview / zmq.Frame -> memoryview without copying."""
    return memoryview(frame)  # a zmq.Frame (recv_multipart(copy=False)) exports its buffer


def decode(frames: Sequence[Any], limits: Limits = DEFAULT_LIMITS) -> Message:
    """Multipart frames -> Message, or ProtocolError naming what is wrong."""
    if len(frames) < 2:
        raise ProtocolError(f"a message needs at least 2 frames (type, body), got {len(frames)}")
    if len(frames) > limits.max_frames:
        raise ProtocolError(f"{len(frames)} frames exceed the limit of {limits.max_frames}")
    bufs = list(map(memoryview, frames))  # no copies (zmq.Frame exports its buffer)
    cls = _message_class(bufs[0])
    body = _unpack_body(bufs[1], limits, cls.__name__)
    for i, b in enumerate(bufs[2:], start=2):
        if b.nbytes > limits.max_frame_bytes:
            raise ProtocolError(
                f"{cls.__name__}: frame {i} has {b.nbytes} bytes, over the limit of "
                f"{limits.max_frame_bytes}"
            )
    if "v" not in body:
        raise ProtocolError(f"{cls.__name__}: body has no protocol version field 'v'")
    if body["v"] != PROTOCOL_VERSION or type(body["v"]) is not int:
        raise ProtocolError(
            f"{cls.__name__}: protocol version {body.get('v')!r} is not supported "
            f"(this side speaks v{PROTOCOL_VERSION})"
        )
    del body["v"]
    used = [True, True] + [False] * (len(bufs) - 2)
    msg = decode_fields(cls, body, DecodeCtx(bufs, used, limits), cls.__name__)
    unused = [i for i, u in enumerate(used) if not u]
    if unused:
        raise ProtocolError(f"{cls.__name__}: frame(s) {unused} are not referenced by the body")
    return msg


def _message_class(head: memoryview) -> type[Message]:
    if head.nbytes != 1:
        raise ProtocolError(f"frame 0 must be the 1-byte message type, got {head.nbytes} bytes")
    cls = _REGISTRY.get(head[0])
    if cls is None:
        raise ProtocolError(f"unknown message type {head[0]:#04x}")
    return cls


def _unpack_body(buf: memoryview, limits: Limits, name: str) -> dict:
    if buf.nbytes > limits.max_body_bytes:
        raise ProtocolError(
            f"{name}: body has {buf.nbytes} bytes, over the limit of {limits.max_body_bytes}"
        )
    try:
        body = msgpack.unpackb(
            buf,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_bin_len,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_ext_len=0,
        )
    except ProtocolError as exc:
        raise ProtocolError(f"{name}: {exc}") from None
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise ProtocolError(f"{name}: body is not valid msgpack: {exc}") from None
    if type(body) is not dict:
        raise ProtocolError(f"{name}: body must be a msgpack map, got {type(body).__name__}")
    return body


def peek_req_id(frames: Sequence[Any]) -> str | None:
    """Best effort: the req_id of a message that failed to decode, to address the error."""
    try:
        buf = _buffer(frames[1])
        if buf.nbytes > DEFAULT_LIMITS.max_body_bytes:
            return None
        body = _unpack_body(buf, DEFAULT_LIMITS, "body")
    except Exception:  # noqa: BLE001 - any failure just means "no req_id"
        return None
    req_id = body.get("req_id") if type(body) is dict else None
    return req_id if type(req_id) is str and 0 < len(req_id) <= 256 else None
