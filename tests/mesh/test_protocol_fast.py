"""The generated fast codec (common.protocol_fast) agrees with the generic one.

The generic path defines what is valid; the fast path may only accept what the generic path
accepts, with an equal result, and must not bail on the plain valid messages of the data
plane (else it would be slow again without anyone noticing).
"""

from __future__ import annotations

import copy
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import protocol as P
from common import protocol_fast
from common.errors import ProtocolError
from common.protocol_codec import _buffer
from common.protocol_fields import DecodeCtx, EncodeCtx, decode_fields, encode_fields
from common.tensorframe import WireTensor
from tests.mesh.test_protocol import samples

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))


def data_plane() -> list[P.Message]:
    """The hot messages, with tensors in frames and inline, and with every optional set."""
    life = P.Lifecycle(t_arrival=1.0, t_tokens=(2.0, 3))
    kv = P.KVPayload("r1", 5, 0, 2, 0, 1, 2, {
        "k": torch.randn(2, 1, 5, 64).to(torch.bfloat16),
        "v": np.arange(5 * 64, dtype=np.float32).reshape(1, 5, 64),
        "small": torch.arange(3)})
    return [
        P.KVHandoff("r1", "enc-0", 7, 5, 9, P.Sampling(0.5, 3, 0.9, 1, (2, 3), True), kv, life),
        P.StagePass(1, 0, "decode", ("a", "b"), (4, 5), free=("c",),
                    hidden=torch.randn(2, 96), stage_times=(0.5, 1)),
        P.StagePass(2, 1, "encode", ("a",), requests=(P.EncodeRequest("a", (1, 2), 4),)),
        P.DecodeTokens("dec-0", 3, 1.5, tuple(
            P.TokenUpdate(f"r{i}", (i, i + 1), i == 2, "stop" if i == 2 else None,
                          life if i % 2 else None) for i in range(4))),
    ]


def _plain(value: Any) -> Any:
    """A comparable form: WireTensors (compared by identity) as (dtype, shape, bytes)."""
    if isinstance(value, WireTensor):
        return ("tensor", value.dtype, value.shape, value.buffer.tobytes())
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, P.Struct):
        return (type(value).__name__, _plain(dict(vars(value))))
    return value


def _both(frames: list[Any]) -> tuple[Any, Any]:
    """(fast result or Bail, generic result or ProtocolError) for a message's frames."""
    bufs = [_buffer(f) for f in frames]
    cls = P.message_types()[bufs[0][0]]
    body = msgpack.unpackb(bufs[1], raw=False, strict_map_key=True)
    body.pop("v", None)  # the version is checked before any field
    fresh = [True, True] + [False] * (len(bufs) - 2)
    try:
        fast: Any = protocol_fast.decoder(cls)(copy.deepcopy(body), bufs, list(fresh),
                                               P.DEFAULT_LIMITS)
    except protocol_fast.BAIL_ERRORS as exc:
        fast = protocol_fast.Bail(str(exc))
    try:
        slow: Any = decode_fields(cls, body, DecodeCtx(bufs, list(fresh), P.DEFAULT_LIMITS),
                                  cls.__name__)
    except ProtocolError as exc:
        slow = exc
    return fast, slow


@pytest.mark.parametrize("msg", samples() + data_plane(), ids=lambda m: type(m).__name__)
def test_fast_and_generic_agree_on_valid_messages(msg: P.Message) -> None:
    frames = P.encode(msg, inline_threshold=256)
    fast, slow = _both(frames)
    assert not isinstance(fast, Exception), f"the fast path bailed on a valid message: {fast}"
    assert _plain(fast) == _plain(slow)
    ctx = EncodeCtx([], 256)
    generic = {"v": P.PROTOCOL_VERSION, **encode_fields(msg, ctx)}
    assert frames[1] == msgpack.packb(generic, use_bin_type=True)
    assert [bytes(f) for f in frames[2:]] == [bytes(f) for f in ctx.frames]


@pytest.mark.parametrize("msg", data_plane(), ids=lambda m: type(m).__name__)
def test_data_plane_messages_never_reach_the_generic_decoder(
        msg: P.Message, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> None:
        raise AssertionError("generic decoder used")

    monkeypatch.setattr("common.protocol_codec.decode_fields", refuse)
    monkeypatch.setattr("common.protocol_codec.encode_fields", refuse)
    assert _plain(P.decode(P.encode(msg))) == _plain(P.decode(P.encode(msg)))


_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=4) | st.binary(max_size=4) | st.sampled_from(["stop", "decode", "r1"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["dtype", "shape", "frame", "data", "k", "req_id"]) | st.text(max_size=3),
        inner, max_size=3),
    max_leaves=8,
)


def _mutate(body: Any, data: st.DataObject) -> Any:
    """Replace, drop or add one value somewhere inside the body (any depth)."""
    node = body
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            break
        key = data.draw(st.sampled_from(keys))
        child = node[key]
        if isinstance(child, dict | list) and data.draw(st.booleans()):
            node = child
            continue
        action = data.draw(st.sampled_from(["replace", "drop", "add"]))
        if action == "replace":
            node[key] = data.draw(_VALUES)
        elif action == "drop" and isinstance(node, dict):
            del node[key]
        elif isinstance(node, dict):
            node[data.draw(st.text(max_size=3))] = data.draw(_VALUES)
        else:
            node.append(data.draw(_VALUES))
        break
    return body


_VALID = [[bytes(memoryview(f).cast("B")) for f in P.encode(m, inline_threshold=256)]
          for m in samples() + data_plane()]


@FUZZ
@given(st.integers(0, len(_VALID) - 1), st.data())
def test_fast_path_accepts_only_what_the_generic_path_accepts(which: int,
                                                              data: st.DataObject) -> None:
    frames = list(_VALID[which])
    body = _mutate(msgpack.unpackb(frames[1]), data)
    frames[1] = msgpack.packb(body, use_bin_type=True)
    fast, slow = _both(frames)
    if not isinstance(fast, Exception):
        assert not isinstance(slow, Exception), f"fast accepted what the generic refused: {slow}"
        assert _plain(fast) == _plain(slow)


def test_errors_are_worded_by_the_generic_path() -> None:
    frames = P.encode(data_plane()[0])
    body = msgpack.unpackb(frames[1])
    body["kv"]["tensors"]["k"]["shape"][0] = 3
    with pytest.raises(ProtocolError, match=r"KVHandoff.kv.tensors\['k'\]: bfloat16"):
        P.decode([frames[0], msgpack.packb(body), *frames[2:]])
    body = msgpack.unpackb(frames[1])
    body["sampling"]["top_p"] = 2
    with pytest.raises(ProtocolError, match=r"KVHandoff.sampling: top_p must be in"):
        P.decode([frames[0], msgpack.packb(body), *frames[2:]])
