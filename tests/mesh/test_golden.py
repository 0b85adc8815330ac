"""Golden bytes: these pin the wire format. If one fails, the format changed: bump
PROTOCOL_VERSION, update docs/wire.md, and only then update the bytes here."""

from __future__ import annotations

import numpy as np

from common import protocol as P


def test_protocol_version_is_pinned() -> None:
    assert P.PROTOCOL_VERSION == 4


def test_type_bytes_are_pinned() -> None:
    got = {cls.__name__: t for t, cls in P.message_types().items()}
    assert got == {
        "Hello": 0x01, "Assign": 0x02, "Ready": 0x03, "Heartbeat": 0x04, "Shutdown": 0x05,
        "Submit": 0x10, "StreamChunk": 0x11, "Result": 0x12, "Cancel": 0x13, "Error": 0x14,
        "StatsRequest": 0x15, "Stats": 0x16,
        "EncodeBatch": 0x20, "KVHandoff": 0x21, "DecodeTokens": 0x22, "StagePass": 0x23,
        "PassDone": 0x24,
    }


CANCEL_BODY = (
    b"\x83"                        # fixmap, 3 entries
    b"\xa1v" b"\x04"               # "v": 4
    b"\xa6req_id" b"\xa2r1"        # "req_id": "r1"
    b"\xa6reason" b"\xa4user"      # "reason": "user"
)

ERROR_BODY = (
    b"\x85"
    b"\xa1v" b"\x04"
    b"\xa4code" b"\xaaoverloaded"
    b"\xa7message" b"\xaaqueue full"
    b"\xa6req_id" b"\xa2r1"
    b"\xadretry_after_s" b"\xcb\x3f\xd0\x00\x00\x00\x00\x00\x00"   # float64 0.25
)


def test_cancel_bytes() -> None:
    frames = P.encode(P.Cancel("r1", "user"))
    assert frames == [b"\x13", CANCEL_BODY]
    assert P.decode([b"\x13", CANCEL_BODY]) == P.Cancel("r1", "user")


def test_error_bytes() -> None:
    frames = P.encode(P.Error("overloaded", "queue full", "r1", 0.25))
    assert frames == [b"\x14", ERROR_BODY]


KV_BODY_HEX = (
    "8aa17604a67265715f6964a27231aa656e636f6465725f6964a26530ab66697273745f746f6b656e2aaa7072"
    "6f6d70745f6c656e02ae6d61785f6e65775f746f6b656e7308a873616d706c696e6786ab74656d7065726174"
    "757265cb0000000000000000a5746f705f6b00a5746f705f70cb3ff0000000000000a473656564c0ae73746f"
    "705f746f6b656e5f69647390aa69676e6f72655f656f73c2a26b7688a67265715f6964a27231a77365715f6c"
    "656e02ab6c617965725f737461727400a96c617965725f656e6401aa686561645f737461727400a868656164"
    "5f656e6401ac6e756d5f6b765f686561647301a774656e736f727382a16b83a56474797065a7666c6f617433"
    "32a573686170659104a56672616d6502a17683a56474797065a5696e743634a573686170659101a464617461"
    "c4080700000000000000a96c6966656379636c6589a9745f6172726976616ccb3ff8000000000000a8745f71"
    "7565756564c0ae745f656e636f64655f7374617274c0ac745f656e636f64655f656e64c0a9745f6b765f7365"
    "6e74c0ad745f6b765f7265636569766564c0ad745f66697273745f746f6b656ec0a8745f746f6b656e7390a8"
    "745f66696e697368c0ad6f75747075745f6f666673657403"  # ... "output_offset": 3
)
# float32 [1.0, 2.0, -0.5, 0.0], little-endian, as frame 2
KV_FRAME = bytes.fromhex("0000803f00000040000000bf00000000")


def _kv_handoff() -> P.KVHandoff:
    tensors = {"k": np.array([1.0, 2.0, -0.5, 0.0], np.float32), "v": np.array([7], np.int64)}
    kv = P.KVPayload("r1", 2, 0, 1, 0, 1, 1, tensors)
    return P.KVHandoff("r1", "e0", 42, 2, 8, P.Sampling(), kv, P.Lifecycle(t_arrival=1.5),
                       output_offset=3)


def test_kv_handoff_bytes_with_one_frame_and_one_inline_tensor() -> None:
    frames = P.encode(_kv_handoff(), inline_threshold=8)
    assert frames[0] == b"\x21"
    assert frames[1] == bytes.fromhex(KV_BODY_HEX)
    assert bytes(frames[2]) == KV_FRAME
    assert len(frames) == 3


def test_kv_handoff_golden_bytes_decode() -> None:
    msg = P.decode([b"\x21", bytes.fromhex(KV_BODY_HEX), KV_FRAME])
    assert msg.first_token == 42 and msg.lifecycle.t_arrival == 1.5
    assert msg.output_offset == 3
    assert msg.kv.tensors["k"].as_numpy().tolist() == [1.0, 2.0, -0.5, 0.0]
    assert msg.kv.tensors["v"].as_numpy().tolist() == [7]
