"""Field types of wire messages: type hints -> compiled encoders and strict decoders.

Why compiled: decoding runs for every message on the control plane, so each Struct class's
fields are turned once into a tuple of small functions (and, for plain int/str/bool/...
fields, an exact-type check that needs no call at all). Error paths are built lazily
(`_Path`) so the common, valid case formats no strings.

Field types understood: int, float, str, bool, bytes, `X | None`, `tuple[X, ...]`,
`dict[str, X]`, nested `Struct`s, `Tensor` (see common.tensorframe) and `Json` (plain
JSON-like data, depth-limited). Every mismatch raises ProtocolError naming the field path.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from common.errors import ProtocolError
from common.tensorframe import decode_tensor, encode_tensor

_TENSOR = "exegpt.tensor"
_JSON = "exegpt.json"
Tensor = Annotated[Any, _TENSOR]
"""A field holding a torch tensor, numpy array or WireTensor (decoded as a WireTensor)."""
Json = Annotated[Any, _JSON]
"""A field holding JSON-like data: None, bool, int, float, str, lists, str-keyed maps."""

_Enc = Callable[[Any, "EncodeCtx"], Any]
_Dec = Callable[[Any, "DecodeCtx", Any], Any]


@dataclass
class EncodeCtx:
    frames: list[Any]
    inline_threshold: int


@dataclass
class DecodeCtx:
    frames: list[memoryview]
    used: list[bool]
    limits: Any  # protocol_codec.Limits


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


@dataclass
class _Codec:
    names: tuple[str, ...]
    name_set: frozenset[str]
    encoders: tuple[_Enc | None, ...]
    # the fields whose values are not sent as they are: (name, encoder, None passes as is)
    encoded: tuple[tuple[str, _Enc, bool], ...]
    # per field: (name, the exact types a valid value may have, decoder); a value of one of
    # those types (e.g. str, or float/None for `float | None`) needs no decoder call
    fields: tuple[tuple[str, tuple[type, ...], _Dec], ...]
    tuple_fields: tuple[str, ...]
    has_check: bool  # the class overrides Struct.check (else decoding skips the call)


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
                (f.name, _compile(_strip_optional(hints[f.name]), "")[0] or p[0],
                 _is_optional(hints[f.name]))
                for f, p in zip(fields, pairs, strict=True) if p[0] is not None
            ),
            tuple(
                (f.name, _exact_types(hints[f.name]), p[1])
                for f, p in zip(fields, pairs, strict=True)
            ),
            tuple_fields,
            cls.check is not Struct.check,
        )
        _CODECS[cls] = codec
    return codec


def _exact_types(tp: Any) -> tuple[type, ...]:
    """Python types whose values need no check beyond their type (empty: always decode):
    the primitive itself, None for any `X | None`, and the scalars of a Json field."""
    optional = _is_optional(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if optional and len(args) == 1:
        tp = args[0]
    none = (type(None),) if optional else ()
    if typing.get_origin(tp) is Annotated and typing.get_args(tp)[1] == _JSON:
        return (type(None), bool, int, float, str)  # _check_json's scalars, at any depth
    if tp not in (int, str, bool, bytes, float):
        return none
    return (tp, *none)


def _strip_optional(tp: Any) -> Any:
    """X for `X | None`, else tp."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if _is_optional(tp) and len(args) == 1 else tp


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


def _dec_int(v: Any, ctx: DecodeCtx, path: str) -> int:
    if type(v) is not int:
        raise _type_error(path, "int", v)
    return v


def _dec_float(v: Any, ctx: DecodeCtx, path: str) -> float:
    if type(v) is float:
        return v
    if type(v) is int:
        return float(v)
    raise _type_error(path, "float", v)


def _dec_str(v: Any, ctx: DecodeCtx, path: str) -> str:
    if type(v) is not str:
        raise _type_error(path, "str", v)
    return v


def _dec_bool(v: Any, ctx: DecodeCtx, path: str) -> bool:
    if type(v) is not bool:
        raise _type_error(path, "bool", v)
    return v


def _dec_bytes(v: Any, ctx: DecodeCtx, path: str) -> bytes:
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
_PLAIN_TYPES: dict[_Dec, type] = {_dec_int: int, _dec_str: str, _dec_bool: bool, _dec_bytes: bytes}


def _optional(enc: _Enc | None, dec: _Dec) -> tuple[_Enc | None, _Dec]:
    def dec_opt(v: Any, ctx: DecodeCtx, path: str) -> Any:
        return None if v is None else dec(v, ctx, path)

    if enc is None:
        return None, dec_opt
    return (lambda v, ctx: None if v is None else enc(v, ctx)), dec_opt


def _sequence(enc: _Enc | None, dec: _Dec) -> tuple[_Enc | None, _Dec]:
    plain = _PLAIN_TYPES.get(dec)  # int/str/bool/bytes elements: one type check each

    def dec_seq(v: Any, ctx: DecodeCtx, path: str) -> tuple:
        if type(v) is not list:
            raise _type_error(path, "array", v)
        if plain is not None:
            for x in v:
                if type(x) is not plain:
                    break
            else:
                return tuple(v)  # token ids, req ids: the common case
        elif dec is _dec_float:
            return tuple([x if type(x) is float else dec(x, ctx, _Path(path, i))
                          for i, x in enumerate(v)])
        return tuple([dec(x, ctx, _Path(path, i)) for i, x in enumerate(v)])

    if enc is None:
        return None, dec_seq
    return (lambda v, ctx: [enc(x, ctx) for x in v]), dec_seq


def _mapping(enc: _Enc | None, dec: _Dec) -> tuple[_Enc | None, _Dec]:
    def dec_map(v: Any, ctx: DecodeCtx, path: str) -> dict:
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
    def enc_struct(v: Any, ctx: EncodeCtx) -> dict:
        if type(v) is not cls:
            raise ProtocolError(f"expected {cls.__name__}, got {type(v).__name__}")
        return encode_fields(v, ctx)

    def dec_struct(v: Any, ctx: DecodeCtx, path: str) -> Struct:
        if type(v) is not dict:
            raise _type_error(path, f"map ({cls.__name__})", v)
        return _decode(cls, _CODECS.get(cls) or _codec(cls), v, ctx, path)

    return enc_struct, dec_struct


def _enc_tensor(v: Any, ctx: EncodeCtx) -> dict:
    return encode_tensor(v, ctx.frames, 2, ctx.inline_threshold)


def _dec_tensor(v: Any, ctx: DecodeCtx, path: str) -> Any:
    return decode_tensor(v, ctx.frames, ctx.used, path, ctx.limits.max_ndim)


def _enc_json(v: Any, ctx: EncodeCtx) -> Any:
    _check_json(v, 64, "json")
    return v


def _dec_json(v: Any, ctx: DecodeCtx, path: str) -> Any:
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


def encode_fields(obj: Any, ctx: EncodeCtx) -> dict:
    codec = _CODECS.get(type(obj)) or _codec(type(obj))
    values = obj.__dict__
    out = {name: values[name] for name in codec.names}  # field order: the wire order
    for name, enc, optional in codec.encoded:  # only the fields that need an encoder
        value = out[name]
        if value is not None or not optional:
            out[name] = enc(value, ctx)
    return out


def decode_fields(cls: type[Struct], body: dict, ctx: DecodeCtx, path: Any) -> Any:
    return _decode(cls, _codec(cls), body, ctx, path)


def _decode(cls: type[Struct], codec: _Codec, body: dict, ctx: DecodeCtx, path: Any) -> Any:
    if body.keys() != codec.name_set:
        _raise_field_mismatch(codec.names, body, path)
    for name, exact, dec in codec.fields:
        v = body[name]
        if type(v) not in exact:
            body[name] = dec(v, ctx, _Path(path, name))
    # Every field is type-checked now and sequences are tuples: the (fresh, exactly keyed)
    # body becomes the instance's attributes; only the semantic check still runs.
    obj = object.__new__(cls)
    object.__setattr__(obj, "__dict__", body)
    if codec.has_check:
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
