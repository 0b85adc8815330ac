"""Generated straight-line codecs for Struct classes: the hot path of every message.

Why: the generic codec (common.protocol_fields) walks each class's field table and calls a
function per non-trivial field, and for the data-plane messages (KVHandoff with its Sampling,
KVPayload and Lifecycle; StagePass; DecodeTokens with many TokenUpdates) that walking costs
more than the checks themselves. Here each Struct class gets one Python function, generated
once from the same type hints, doing the same checks inline (the `dataclasses` module makes
`__init__` the same way).

The fast path only ever decides "valid": whenever a value is not plainly valid it raises
`Bail` (or lets the ProtocolError / ValueError of a shared check escape), and the caller
reruns the generic path on the untouched body. So the generic path remains the one
definition of what is refused and how the error is worded, and the fast path must accept
exactly what the generic path accepts, producing equal values
(tests/mesh/test_protocol_fast.py checks both on valid and mutated messages).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any

from common.errors import ProtocolError
from common.protocol_fields import _JSON, _TENSOR, Struct, _check_json
from common.tensorframe import DTYPES, _trusted, decode_tensor, encode_tensor

__all__ = ["Bail", "BAIL_ERRORS", "decoder", "encoder"]


class Bail(Exception):
    """The fast path is not sure: the generic path decides (and words any error)."""


BAIL = Bail()
BAIL_ERRORS = (Bail, ProtocolError, ValueError, TypeError)
"""What a fast decoder may raise for a message the generic path must then judge."""

_FRAME_KEYS = frozenset(("dtype", "shape", "frame"))
_PRIMITIVES = (int, str, bool, bytes)

FastDecoder = Callable[[dict, list, list, Any], Any]
FastEncoder = Callable[[Any, list, int], dict]


def _bail(*_: Any) -> Any:
    raise BAIL


def _float(x: Any) -> float:
    if type(x) is int:
        return float(x)
    raise BAIL


def _tensor(e: Any, frames: list, used: list, limits: Any) -> Any:
    """A frame tensor checked as `tensorframe.decode_tensor` does, with fewer calls."""
    if type(e) is not dict or e.keys() != _FRAME_KEYS:
        return decode_tensor(e, frames, used, "tensor", limits.max_ndim)  # inline / errors
    dtype, shape, index = e["dtype"], e["shape"], e["frame"]
    if type(dtype) is not str or type(shape) is not list or type(index) is not int:
        raise BAIL
    info = DTYPES.get(dtype)
    if info is None or len(shape) > limits.max_ndim or not 2 <= index < len(frames):
        raise BAIL
    n = info[0]
    for d in shape:
        if type(d) is not int or d < 0:
            raise BAIL
        n *= d
    buf = frames[index]
    if used[index] or buf.nbytes != n:
        raise BAIL
    used[index] = True
    return _trusted(dtype, tuple(shape), buf)


def _json(v: Any, limits: Any) -> None:
    _check_json(v, limits.max_depth, "json")


class _Gen:
    """Builds the source of one module of functions; names are bound in `ns`."""

    def __init__(self) -> None:
        self.ns: dict[str, Any] = {
            "_BAIL": BAIL, "_bail": _bail, "_float": _float, "_tensor": _tensor,
            "_json": _json, "_check_json": _check_json, "_encode_tensor": encode_tensor,
            "_new": object.__new__, "_set": object.__setattr__,
        }
        self.count = 0

    def bind(self, value: Any, prefix: str) -> str:
        self.count += 1
        name = f"_{prefix}{self.count}"
        self.ns[name] = value
        return name

    def define(self, name: str, lines: list[str]) -> Callable[..., Any]:
        exec("\n".join(lines), self.ns)  # noqa: S102 - our own generated source, no input
        return self.ns[name]


_DECODERS: dict[type, FastDecoder] = {}
_ENCODERS: dict[tuple[type, bool], FastEncoder] = {}


def _fields(cls: type) -> list[tuple[str, Any]]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(cls) if f.init]


def _unwrap_optional(tp: Any) -> Any | None:
    """X for `X | None`, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(rest) == 1 and len(typing.get_args(tp)) == 2:
            return rest[0]
    return None


# ---------------------------------------------------------------- decoding


def decoder(cls: type[Struct]) -> FastDecoder:
    """fn(body, frames, used, limits) -> instance of cls, or raises one of BAIL_ERRORS."""
    fn = _DECODERS.get(cls)
    if fn is None:
        fn = _DECODERS[cls] = _gen_decoder(_Gen(), cls)
    return fn


def _gen_decoder(g: _Gen, cls: type[Struct]) -> FastDecoder:
    lines = ["def _dec(d, fr, used, lim):"]
    _emit_struct(g, cls, "d", lines, 1)
    lines.append("    return d")
    return g.define("_dec", lines)


def _emit_struct(g: _Gen, cls: type[Struct], var: str, lines: list[str], depth: int) -> None:
    """Statements that replace the map `var` by the checked instance of cls (nested Structs
    inline: one function per message, not one call per nested value)."""
    pad = "    " * depth
    fields = _fields(cls)
    keys = g.bind(frozenset(n for n, _ in fields), "K")
    lines += [f"{pad}if {var}.keys() != {keys}:", f"{pad}    raise _BAIL"]
    names = [f"{var}_{i}" for i in range(len(fields))]
    for (name, tp), v in zip(fields, names, strict=True):
        lines.append(f"{pad}{v} = {var}[{name!r}]")
        _emit_check(g, tp, v, lines, depth)
    body = ", ".join(f"{name!r}: {v}" for (name, _), v in zip(fields, names, strict=True))
    lines += [f"{pad}{var} = _new({g.bind(cls, 'C')})",
              f"{pad}_set({var}, '__dict__', {{{body}}})"]
    if cls.check is not Struct.check:
        lines.append(f"{pad}{var}.check()")


def _emit_check(g: _Gen, tp: Any, var: str, lines: list[str], depth: int) -> None:
    """Statements that check `var` against tp, replacing it by its decoded value."""
    pad = "    " * depth
    inner = _unwrap_optional(tp)
    if inner is not None:
        lines.append(f"{pad}if {var} is not None:")
        _emit_check(g, inner, var, lines, depth + 1)
        return
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        if args[1] == _TENSOR:
            lines.append(f"{pad}{var} = _tensor({var}, fr, used, lim)")
        elif args[1] == _JSON:
            lines.append(f"{pad}_json({var}, lim)")
        else:
            raise TypeError(f"unknown annotation {args[1]!r}")
    elif tp in _PRIMITIVES:
        lines += [f"{pad}if type({var}) is not {tp.__name__}:", f"{pad}    raise _BAIL"]
    elif tp is float:
        lines += [f"{pad}if type({var}) is not float:",
                  f"{pad}    if type({var}) is not int:", f"{pad}        raise _BAIL",
                  f"{pad}    {var} = float({var})"]
    elif origin is tuple:
        lines += [f"{pad}if type({var}) is not list:", f"{pad}    raise _BAIL"]
        elem = args[0]
        if elem in _PRIMITIVES:
            lines += [f"{pad}for _x in {var}:", f"{pad}    if type(_x) is not {elem.__name__}:",
                      f"{pad}        raise _BAIL", f"{pad}{var} = tuple({var})"]
        elif elem is float:
            lines.append(f"{pad}{var} = tuple([_x if type(_x) is float else _float(_x) "
                         f"for _x in {var}])")
        else:
            conv = _converter(g, elem)
            lines.append(f"{pad}{var} = tuple([{conv}(_x, fr, used, lim) for _x in {var}])")
    elif origin is dict:
        conv = _converter(g, args[1])
        lines += [f"{pad}if type({var}) is not dict:", f"{pad}    raise _BAIL",
                  f"{pad}for _k in {var}:", f"{pad}    if type(_k) is not str:",
                  f"{pad}        raise _BAIL",
                  f"{pad}{var} = {{_k: {conv}(_x, fr, used, lim) for _k, _x in {var}.items()}}"]
    elif isinstance(tp, type) and issubclass(tp, Struct):
        lines += [f"{pad}if type({var}) is not dict:", f"{pad}    raise _BAIL"]
        _emit_struct(g, tp, var, lines, depth)
    else:
        raise TypeError(f"unsupported field type {tp!r}")


def _converter(g: _Gen, tp: Any) -> str:
    """Name of a generated fn(v, fr, used, lim) -> decoded value (for elements/values)."""
    if typing.get_origin(tp) is Annotated and typing.get_args(tp)[1] == _TENSOR:
        return "_tensor"
    lines = ["def _conv(v, fr, used, lim):"]
    _emit_check(g, tp, "v", lines, 1)
    lines.append("    return v")
    return g.bind(g.define("_conv", lines), "V")


# ---------------------------------------------------------------- encoding


def encoder(cls: type[Struct], version: int | None = None) -> FastEncoder:
    """fn(obj, frames, inline_threshold) -> body dict (with "v" first when version is set);
    tensor frames are appended to `frames`. Any exception: the generic path decides."""
    key = (cls, version is not None)
    fn = _ENCODERS.get(key)
    if fn is None:
        fn = _ENCODERS[key] = _gen_encoder(_Gen(), cls, version)
    return fn


def _gen_encoder(g: _Gen, cls: type[Struct], version: int | None) -> FastEncoder:
    fields = _fields(cls)
    items = [] if version is None else [f"'v': {version!r}"]
    lines = ["def _enc(o, frames, thr):", "    d = o.__dict__"]
    for i, (name, tp) in enumerate(fields):
        lines.append(f"    v{i} = d[{name!r}]")
        expr = _enc_expr(g, tp, f"v{i}", 0)
        if expr is not None:
            lines.append(f"    v{i} = {expr}")
        items.append(f"{name!r}: v{i}")
    lines.append(f"    return {{{', '.join(items)}}}")
    return g.define("_enc", lines)


def _enc_expr(g: _Gen, tp: Any, var: str, depth: int) -> str | None:
    """An expression encoding `var` (a plain name), or None when the value goes as it is."""
    inner = _unwrap_optional(tp)
    if inner is not None:
        expr = _enc_expr(g, inner, var, depth)
        return None if expr is None else f"(None if {var} is None else {expr})"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    x = f"_x{depth}"
    if origin is Annotated:
        if args[1] == _TENSOR:
            return f"_encode_tensor({var}, frames, 2, thr)"
        return f"(_check_json({var}, 64, 'json') or {var})"
    if origin is tuple:
        expr = _enc_expr(g, args[0], x, depth + 1)
        return None if expr is None else f"[{expr} for {x} in {var}]"
    if origin is dict:
        expr = _enc_expr(g, args[1], x, depth + 1)
        k = f"_k{depth}"
        return None if expr is None else f"{{{k}: {expr} for {k}, {x} in {var}.items()}}"
    if isinstance(tp, type) and issubclass(tp, Struct):
        fn, c = g.bind(encoder(tp), "E"), g.bind(tp, "C")
        return f"({fn}({var}, frames, thr) if type({var}) is {c} else _bail())"
    return None
