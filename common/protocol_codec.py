"""The machinery behind `common.protocol`: typed frozen dataclasses <-> multipart frames.

Why a schema-driven codec: every message is a frozen dataclass whose type hints are the
schema, so encoding and strict decoding come from one declaration and cannot drift apart.
A message on the wire is

    frame 0   1 byte: the message type (Message.TYPE)
    frame 1   msgpack map: {"v": PROTOCOL_VERSION, <field>: <value>, ...} in field order
    frame 2.. one raw frame per large tensor (the body entry names its frame index)

Field types understood: int, float, str, bool, bytes, `X | None`, `tuple[X, ...]`,
`dict[str, X]`, nested `Struct`s, `Tensor` (see common.tensorframe) and `Json` (plain
JSON-like data, depth-limited). Decoding checks every one of them and raises only
ProtocolError; it never evaluates or unpickles anything (msgpack ext types are refused).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import msgpack

from common.errors import ProtocolError
from common.tensorframe import DEFAULT_INLINE_THRESHOLD, decode_tensor, encode_tensor

PROTOCOL_VERSION = 1

_TENSOR = "exegpt.tensor"
_JSON = "exegpt.json"
Tensor = Annotated[Any, _TENSOR]
"""A field holding a torch tensor, numpy array or WireTensor (decoded as a WireTensor)."""
Json = Annotated[Any, _JSON]
"""A field holding JSON-like data: None, bool, int, float, str, lists, str-keyed maps."""


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

_Enc = Callable[[Any, "_EncodeCtx"], Any]
_Dec = Callable[[Any, "_DecodeCtx", str], Any]


@dataclass
class _EncodeCtx:
    frames: list[Any]
    inline_threshold: int


@dataclass
class _DecodeCtx:
    frames: list[memoryview]
    used: list[bool]
    limits: Limits


class Struct:
    """Base of every message and nested value: lists become tuples, then `check()` runs."""

    def __post_init__(self) -> None:
        for name in _codec(type(self)).tuple_fields:
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self.check()

    def check(self) -> None:
        """Semantic validation; raise ValueError naming the field and what to do."""


class Message(Struct):
    """A top-level wire message; subclasses set a unique one-byte TYPE."""

    TYPE: ClassVar[int] = -1


class _Path:
    """Where a value sits in a message, formatted only when an error names it (hot path)."""

    __slots__ = ("parent", "key")

    def __init__(self, parent: _Path | str, key: str | int | tuple[str]) -> None:
        self.parent, self.key = parent, key

    def __str__(self) -> str:
        key = self.key
        if isinstance(key, int):
            return f"{self.parent}[{key}]"
        if isinstance(key, tuple):
            return f"{self.parent}[{key[0]!r}]"
        return f"{self.parent}.{key}"


_REGISTRY: dict[int, type[Message]] = {}


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


# ---------------------------------------------------------------- per-class compiled codecs


@dataclass
class _Codec:
    names: tuple[str, ...]
    name_set: frozenset[str]
    encoders: tuple[_Enc | None, ...]
    # per field: (name, exact primitive type or None, decoder); the exact type lets the
    # common case (right type) skip a function call
    fields: tuple[tuple[str, type | None, _Dec], ...]
    tuple_fields: tuple[str, ...]


_CODECS: dict[type, _Codec] = {}


def _codec(cls: type) -> _Codec:
    codec = _CODECS.get(cls)
    if codec is None:
        hints = typing.get_type_hints(cls, include_extras=True)
        fields = [f for f in dataclasses.fields(cls) if f.init]
        pairs = [_compile(hints[f.name], f"{cls.__name__}.{f.name}") for f in fields]
        tuple_fields = tuple(f.name for f in fields if _is_tuple(hints[f.name]))
        names = tuple(f.name for f in fields)
        codec = _Codec(
            names,
            frozenset(names),
            tuple(p[0] for p in pairs),
            tuple(
                (f.name, _exact_type(hints[f.name]), p[1])
                for f, p in zip(fields, pairs, strict=True)
            ),
            tuple_fields,
        )
        _CODECS[cls] = codec
    return codec


def _exact_type(tp: Any) -> type | None:
    """The one Python type a field's valid values have, when that is all there is to check."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if _is_optional(tp) and len(args) == 1:
        tp = args[0]
    return tp if tp in (int, str, bool, bytes, float) else None


def _is_tuple(tp: Any) -> bool:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if _is_optional(tp) and len(args) == 1:
        tp = args[0]
    return typing.get_origin(tp) is tuple


def _is_optional(tp: Any) -> bool:
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    return union and type(None) in typing.get_args(tp)


def _compile(tp: Any, where: str) -> tuple[_Enc | None, _Dec]:
    """(encoder or None for identity, strict decoder) for one type hint."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return _compile_marker(args[1], where)
    if _is_optional(tp):
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"{where}: only `X | None` unions are supported")
        return _optional(*_compile(rest[0], where))
    if origin is tuple:
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"{where}: use tuple[X, ...]")
        return _sequence(*_compile(args[0], where))
    if origin is dict:
        if args[0] is not str:
            raise TypeError(f"{where}: dict keys must be str")
        return _mapping(*_compile(args[1], where))
    if isinstance(tp, type) and issubclass(tp, Struct):
        return _struct(tp)
    if tp in _PRIMITIVE_DECODERS:
        return None, _PRIMITIVE_DECODERS[tp]
    raise TypeError(f"{where}: unsupported field type {tp!r}")


def _compile_marker(marker: Any, where: str) -> tuple[_Enc | None, _Dec]:
    if marker == _TENSOR:
        return _enc_tensor, _dec_tensor
    if marker == _JSON:
        return _enc_json, _dec_json
    raise TypeError(f"{where}: unknown annotation {marker!r}")


def _type_error(path: str, want: str, value: Any) -> ProtocolError:
    return ProtocolError(f"{path}: expected {want}, got {type(value).__name__}")


def _dec_int(v: Any, ctx: _DecodeCtx, path: str) -> int:
    if type(v) is not int:
        raise _type_error(path, "int", v)
    return v


def _dec_float(v: Any, ctx: _DecodeCtx, path: str) -> float:
    if type(v) is float:
        return v
    if type(v) is int:
        return float(v)
    raise _type_error(path, "float", v)


def _dec_str(v: Any, ctx: _DecodeCtx, path: str) -> str:
    if type(v) is not str:
        raise _type_error(path, "str", v)
    return v


def _dec_bool(v: Any, ctx: _DecodeCtx, path: str) -> bool:
    if type(v) is not bool:
        raise _type_error(path, "bool", v)
    return v


def _dec_bytes(v: Any, ctx: _DecodeCtx, path: str) -> bytes:
    if type(v) is not bytes:
        raise _type_error(path, "bytes", v)
    return v


_PRIMITIVE_DECODERS: dict[type, _Dec] = {
    int: _dec_int,
    float: _dec_float,
    str: _dec_str,
    bool: _dec_bool,
    bytes: _dec_bytes,
}


def _optional(enc: _Enc | None, dec: _Dec) -> tuple[_Enc | None, _Dec]:
    def dec_opt(v: Any, ctx: _DecodeCtx, path: str) -> Any:
        return None if v is None else dec(v, ctx, path)

    if enc is None:
        return None, dec_opt
    return (lambda v, ctx: None if v is None else enc(v, ctx)), dec_opt


def _sequence(enc: _Enc | None, dec: _Dec) -> tuple[_Enc | None, _Dec]:
    def dec_seq(v: Any, ctx: _DecodeCtx, path: str) -> tuple:
        if type(v) is not list:
            raise _type_error(path, "array", v)
        if dec is _dec_int and all(type(x) is int for x in v):
            return tuple(v)  # fast path: token id lists
        return tuple([dec(x, ctx, _Path(path, i)) for i, x in enumerate(v)])

    if enc is None:
        return None, dec_seq
    return (lambda v, ctx: [enc(x, ctx) for x in v]), dec_seq


def _mapping(enc: _Enc | None, dec: _Dec) -> tuple[_Enc | None, _Dec]:
    def dec_map(v: Any, ctx: _DecodeCtx, path: str) -> dict:
        if type(v) is not dict:
            raise _type_error(path, "map", v)
        out = {}
        for k, x in v.items():
            if type(k) is not str:
                raise ProtocolError(f"{path}: map keys must be str, got {type(k).__name__}")
            out[k] = dec(x, ctx, _Path(path, (k,)))
        return out

    if enc is None:
        return None, dec_map
    return (lambda v, ctx: {k: enc(x, ctx) for k, x in v.items()}), dec_map


def _struct(cls: type[Struct]) -> tuple[_Enc, _Dec]:
    def enc_struct(v: Any, ctx: _EncodeCtx) -> dict:
        if type(v) is not cls:
            raise ProtocolError(f"expected {cls.__name__}, got {type(v).__name__}")
        return _encode_fields(v, ctx)

    def dec_struct(v: Any, ctx: _DecodeCtx, path: str) -> Struct:
        if type(v) is not dict:
            raise _type_error(path, f"map ({cls.__name__})", v)
        return _decode_fields(cls, v, ctx, path)

    return enc_struct, dec_struct


def _enc_tensor(v: Any, ctx: _EncodeCtx) -> dict:
    return encode_tensor(v, ctx.frames, 2, ctx.inline_threshold)


def _dec_tensor(v: Any, ctx: _DecodeCtx, path: str) -> Any:
    return decode_tensor(v, ctx.frames, ctx.used, path, ctx.limits.max_ndim)


def _enc_json(v: Any, ctx: _EncodeCtx) -> Any:
    _check_json(v, 64, "json")
    return v


def _dec_json(v: Any, ctx: _DecodeCtx, path: str) -> Any:
    _check_json(v, ctx.limits.max_depth, path)
    return v


def _check_json(v: Any, depth: int, path: str) -> None:
    if v is None or type(v) in (bool, int, float, str):
        return
    if depth <= 0:
        raise ProtocolError(f"{path}: nested too deeply")
    if type(v) in (list, tuple):
        for x in v:
            _check_json(x, depth - 1, path)
    elif type(v) is dict:
        for k, x in v.items():
            if type(k) is not str:
                raise ProtocolError(f"{path}: map keys must be str, got {type(k).__name__}")
            _check_json(x, depth - 1, path)
    else:
        raise ProtocolError(f"{path}: {type(v).__name__} is not JSON-like data")


def _encode_fields(obj: Any, ctx: _EncodeCtx) -> dict:
    codec = _codec(type(obj))
    values = obj.__dict__
    out = {}
    for name, enc in zip(codec.names, codec.encoders, strict=True):
        value = values[name]
        out[name] = value if enc is None else enc(value, ctx)
    return out


def _decode_fields(cls: type[Struct], body: dict, ctx: _DecodeCtx, path: Any) -> Any:
    codec = _codec(cls)
    if body.keys() != codec.name_set:
        _raise_field_mismatch(codec.names, body, path)
    values = {}
    for name, exact, dec in codec.fields:
        v = body[name]
        if exact is None or type(v) is not exact:
            v = dec(v, ctx, _Path(path, name))
        values[name] = v
    # Every field was type-checked above and sequences are already tuples, so skip
    # __init__/normalisation and run only the semantic check.
    obj = object.__new__(cls)
    obj.__dict__.update(values)
    try:
        obj.check()
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"{path}: {exc}") from None
    return obj


def _raise_field_mismatch(names: Sequence[str], body: dict, path: str) -> None:
    missing = [n for n in names if n not in body]
    extra = [repr(k) for k in body if k not in names]
    parts = []
    if missing:
        parts.append(f"missing field(s) {', '.join(missing)}")
    if extra:
        parts.append(f"unknown field(s) {', '.join(extra)}")
    raise ProtocolError(f"{path}: {'; '.join(parts)}")


# ---------------------------------------------------------------- whole messages


def encode(msg: Message, *, inline_threshold: int = DEFAULT_INLINE_THRESHOLD) -> list[Any]:
    """Message -> multipart frames [type byte, msgpack body, tensor buffers...].

    Tensor frames are views over the tensors' own memory: send them with copy=False and do
    not modify the tensors until the send has completed.
    """
    if type(msg).TYPE not in _REGISTRY or _REGISTRY[type(msg).TYPE] is not type(msg):
        raise ProtocolError(f"{type(msg).__name__} is not a registered message type")
    ctx = _EncodeCtx([], inline_threshold)
    body = {"v": PROTOCOL_VERSION}
    body.update(_encode_fields(msg, ctx))
    try:
        packed = msgpack.packb(body, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"{type(msg).__name__}: cannot pack body: {exc}") from None
    return [bytes((msg.TYPE,)), packed, *ctx.frames]


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not allowed")


def _buffer(frame: Any) -> memoryview:
    """bytes / bytearray / memoryview / zmq.Frame -> memoryview without copying."""
    buf = getattr(frame, "buffer", None)  # zmq.Frame from recv_multipart(copy=False)
    return buf if isinstance(buf, memoryview) else memoryview(frame)


def decode(frames: Sequence[Any], limits: Limits = DEFAULT_LIMITS) -> Message:
    """Multipart frames -> Message, or ProtocolError naming what is wrong."""
    if len(frames) < 2:
        raise ProtocolError(f"a message needs at least 2 frames (type, body), got {len(frames)}")
    if len(frames) > limits.max_frames:
        raise ProtocolError(f"{len(frames)} frames exceed the limit of {limits.max_frames}")
    bufs = [_buffer(f) for f in frames]
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
    ctx = _DecodeCtx(bufs, [True, True] + [False] * (len(bufs) - 2), limits)
    msg = _decode_fields(cls, body, ctx, cls.__name__)
    unused = [i for i, u in enumerate(ctx.used) if not u]
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
