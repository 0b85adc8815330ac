"""Property-based fuzzing of the decoder: whatever arrives, it decodes or raises ProtocolError."""

from __future__ import annotations

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import protocol as P
from common.errors import ProtocolError

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


def _valid_frames() -> list[list[bytes]]:
    kv = P.KVPayload("r", 2, 0, 1, 0, 1, 1, {"k": np.arange(300, dtype=np.float32),
                                             "v": np.arange(3, dtype=np.int64)})
    msgs = [
        P.Submit("r", prompt_ids=(1, 2, 3), sampling=P.Sampling(top_k=3), timeout_s=1.0),
        P.KVHandoff("r", "e", 1, 2, 3, P.Sampling(), kv, P.Lifecycle(t_arrival=1.0)),
        P.DecodeTokens("d", 1, 2.0, (P.TokenUpdate("r", (1, 2), True, "stop"),)),
        P.Stats("s", {"a": [1, {"b": None}]}, {"r": P.Lifecycle(t_tokens=(1.0,))}),
    ]
    return [[bytes(f) for f in P.encode(m)] for m in msgs]


VALID = _valid_frames()


def _decode_or_protocol_error(frames: list[bytes]) -> None:
    try:
        P.decode(frames, P.Limits(max_frame_bytes=1 << 20))
    except ProtocolError:
        pass


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_random_frames(frames: list[bytes]) -> None:
    _decode_or_protocol_error(frames)


@FUZZ
@given(st.sampled_from(sorted(P.message_types())), st.binary(max_size=256))
def test_random_body_for_every_type(type_byte: int, body: bytes) -> None:
    _decode_or_protocol_error([bytes((type_byte,)), body])


_MSGPACK_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20,
)


@FUZZ
@given(st.integers(0, len(VALID) - 1), st.data())
def test_valid_bodies_with_one_field_replaced(which: int, data: st.DataObject) -> None:
    frames = VALID[which]
    body = msgpack.unpackb(frames[1])
    key = data.draw(st.sampled_from(sorted(body)))
    body[key] = data.draw(_MSGPACK_VALUES)
    _decode_or_protocol_error([frames[0], msgpack.packb(body, use_bin_type=True), *frames[2:]])


@FUZZ
@given(st.integers(0, len(VALID) - 1), st.data())
def test_valid_messages_with_bytes_flipped_or_cut(which: int, data: st.DataObject) -> None:
    frames = [bytearray(f) for f in VALID[which]]
    index = data.draw(st.integers(0, len(frames) - 1))
    frame = frames[index]
    if frame and data.draw(st.booleans()):
        pos = data.draw(st.integers(0, len(frame) - 1))
        frame[pos] = data.draw(st.integers(0, 255))
    else:
        del frame[data.draw(st.integers(0, len(frame))):]
    if data.draw(st.booleans()):
        frames = frames[: data.draw(st.integers(0, len(frames)))]
    _decode_or_protocol_error([bytes(f) for f in frames])
