"""Round trips of every message type, and strict decoding of malformed messages."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from common import protocol as P
from common.errors import ProtocolError

LIFE = P.Lifecycle(t_arrival=1.5, t_queued=1.6, t_encode_start=2.0, t_tokens=(3.0, 3.25),
                   t_finish=4.0)
SAMPLING = P.Sampling(temperature=0.7, top_k=40, top_p=0.9, seed=7, stop_token_ids=(2, 3))


def samples() -> list[P.Message]:
    """One instance of every message type with non-default values everywhere."""
    kv = P.KVPayload("r1", 3, 0, 2, 0, 1, 2, {})
    return [
        P.Hello("enc-0", "encoder", 1, 2, "cpu", 123, "host-a", "ipc:///tmp/kv0",
                {"kv_bytes": 1 << 30, "max_batch": 64}),
        P.Assign("enc-0", "encoder", 1, 1, 2, (0, 4), None, {"dec-0": "tcp://h:5"}, 0.5,
                 {"plan": {"policy": "waa-c", "B_E": 8}}),
        P.Ready("dec-0", "tcp://h:5", {"pid": 9}),
        P.Heartbeat("dec-0", 42, 1234.5, {"active": 3, "kv_used": 0.25}),
        P.Shutdown("sigterm", False),
        P.Submit("r1", prompt="héllo ☃", max_new_tokens=9, sampling=SAMPLING, stream=True,
                 timeout_s=2.5, chat=True),
        P.Submit("r2", prompt_ids=(1, 2, 3), max_new_tokens=1),
        P.StreamChunk("r1", 4, (10, 11), "ab"),
        P.Result("r1", (10, 11, 12), "length", "abc", 5, LIFE),
        P.Cancel("r1", "user"),
        P.Error("overloaded", "queue full", "r1", 0.25),
        P.Error("internal", "boom"),
        P.StatsRequest("s1", True),
        P.Stats("s1", {"throughput": 1.5, "workers": [{"id": "a"}]}, {"r1": LIFE}),
        P.EncodeBatch(7, (P.EncodeRequest("r1", (5, 6), 4, SAMPLING, "dec-1", LIFE),
                          P.EncodeRequest("r2", (7,), 2))),
        P.KVHandoff("r1", "enc-0", 99, 3, 8, SAMPLING, kv, LIFE),
        P.DecodeTokens("dec-0", 17, 99.5, (P.TokenUpdate("r1", (5,)),
                                           P.TokenUpdate("r2", (6, 7), True, "stop", LIFE))),
        P.StagePass(3, 1, "encode", ("r1",), requests=(P.EncodeRequest("r1", (5, 6), 4),),
                    free=("r0",), stage_times=(0.5,)),
        P.StagePass(4, 0, "decode", ("r1", "r2"), tokens=(9, 10)),
        P.PassDone("stage-1", 4, 0, "decode", (P.TokenUpdate("r1", (11,)),), (0.1, 0.2)),
        P.PassDone("stage-1", 5, 0, "encode", error="boom"),
    ]


def test_every_registered_type_has_a_sample() -> None:
    assert {type(m) for m in samples()} == set(P.message_types().values())


@pytest.mark.parametrize("msg", samples(), ids=lambda m: type(m).__name__)
def test_round_trip(msg: P.Message) -> None:
    frames = P.encode(msg)
    assert frames[0] == bytes((type(msg).TYPE,))
    assert P.decode(frames) == msg
    assert P.decode([bytes(f) for f in frames]) == msg


def test_stage_pass_carries_hidden_rows() -> None:
    hidden = np.arange(2 * 8, dtype=np.float32).reshape(2, 8)
    msg = P.StagePass(3, 1, "decode", ("r1", "r2"), tokens=(4, 5), hidden=hidden)
    got = P.decode(P.encode(msg))
    assert got.req_ids == ("r1", "r2") and got.tokens == (4, 5)
    assert np.array_equal(np.asarray(got.hidden.as_numpy()), hidden)


def test_stage_pass_rejects_mismatched_tokens() -> None:
    with pytest.raises(ValueError, match="one token per request"):
        P.StagePass(1, 0, "decode", ("r1", "r2"), tokens=(4,))


def test_lists_become_tuples_so_round_trips_compare_equal() -> None:
    msg = P.Submit("r", prompt_ids=[1, 2], sampling=P.Sampling(stop_token_ids=[9]))
    assert msg.prompt_ids == (1, 2) and msg.sampling.stop_token_ids == (9,)
    assert P.decode(P.encode(msg)) == msg


def test_kv_handoff_with_tensors_round_trips() -> None:
    k = np.arange(2 * 1 * 3 * 64, dtype=np.float32).reshape(2, 1, 3, 64)
    v = np.arange(4, dtype=np.int64)
    kv = P.KVPayload("r", 3, 0, 2, 0, 1, 1, {"k": k, "v": v})
    frames = P.encode(P.KVHandoff("r", "e", 1, 3, 4, P.Sampling(), kv))
    assert len(frames) == 3  # k is large (own frame), v is small (inline)
    out = P.decode(frames)
    assert np.array_equal(out.kv.tensors["k"].as_numpy(), k)
    assert np.array_equal(out.kv.tensors["v"].as_numpy(), v)


def test_lifecycle_derived_values_and_merge() -> None:
    assert LIFE.latency == pytest.approx(2.5)
    assert LIFE.tpot == pytest.approx(0.25)
    assert LIFE.ttft is None
    merged = LIFE.merged(P.Lifecycle(t_arrival=0.0, t_first_token=3.0, t_kv_sent=2.5))
    assert merged.t_arrival == 1.5 and merged.t_first_token == 3.0 and merged.t_kv_sent == 2.5
    assert merged.ttft == pytest.approx(1.5)


def test_kv_payload_from_an_engine_export_like_object() -> None:
    class Export:
        req_id, seq_len, layer_start, layer_end = "r", 2, 0, 1
        head_start, head_end, num_kv_heads, tensors = 0, 1, 1, {}

    assert P.KVPayload.from_export(Export()) == P.KVPayload("r", 2, 0, 1, 0, 1, 1, {})


@pytest.mark.parametrize(
    "make",
    [
        lambda: P.Submit("r"),
        lambda: P.Submit("r", prompt="a", prompt_ids=(1,)),
        lambda: P.Submit("r", prompt_ids=()),
        lambda: P.Submit("r", prompt="a", max_new_tokens=0),
        lambda: P.Submit("", prompt="a"),
        lambda: P.Submit("r", prompt="a", timeout_s=0.0),
        lambda: P.Sampling(temperature=-1.0),
        lambda: P.Sampling(top_p=0.0),
        lambda: P.Hello("w", "chef"),
        lambda: P.Hello("w", "encoder", tp_rank=2, tp_size=2),
        lambda: P.Assign("w", "any"),
        lambda: P.Assign("w", "decoder", layer_range=(3, 1)),
        lambda: P.Error("nope", "x"),
        lambda: P.Result("r", (), "exploded"),
        lambda: P.TokenUpdate("r", (1,), finished=True),
        lambda: P.KVPayload("r", 1, 0, 1, 0, 3, 2),
    ],
)
def test_invalid_values_are_refused_at_construction(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        make()


# ---------------------------------------------------------------- strict decoding


def _body(msg: P.Message) -> dict:
    return msgpack.unpackb(P.encode(msg)[1])


def _frames(type_byte: int, body: object, *extra: bytes) -> list[bytes]:
    return [bytes((type_byte,)), msgpack.packb(body, use_bin_type=True), *extra]


def _decode_error(frames: list, **limits: int) -> str:
    with pytest.raises(ProtocolError) as info:
        P.decode(frames, P.Limits(**limits) if limits else P.DEFAULT_LIMITS)
    return str(info.value)


CANCEL = P.Cancel("r1", "x")


def test_unknown_type_byte() -> None:
    assert "unknown message type 0xee" in _decode_error(_frames(0xEE, _body(CANCEL)))


def test_type_frame_must_be_one_byte() -> None:
    assert "1-byte" in _decode_error([b"\x13\x00", P.encode(CANCEL)[1]])


def test_too_few_frames() -> None:
    assert "at least 2 frames" in _decode_error([b"\x13"])


@pytest.mark.parametrize("version", [1, 2, 3, 5, 0, "4", None, 4.0])
def test_wrong_version(version: object) -> None:
    body = _body(CANCEL) | {"v": version}
    assert "protocol version" in _decode_error(_frames(0x13, body))


def test_missing_version() -> None:
    body = {"req_id": "r", "reason": ""}
    assert "no protocol version" in _decode_error(_frames(0x13, body))


def test_missing_and_extra_fields_are_named() -> None:
    body = _body(CANCEL)
    del body["reason"]
    assert "missing field(s) reason" in _decode_error(_frames(0x13, body))
    body = _body(CANCEL) | {"evil": 1}
    assert "unknown field(s) 'evil'" in _decode_error(_frames(0x13, body))


@pytest.mark.parametrize(
    ("field", "value", "want"),
    [
        ("max_new_tokens", "9", "int"),
        ("max_new_tokens", True, "int"),
        ("max_new_tokens", 9.0, "int"),
        ("stream", 1, "bool"),
        ("prompt", b"bytes", "str"),
        ("prompt_ids", {"a": 1}, "array"),
        ("timeout_s", "2", "float"),
        ("sampling", [1, 2], "map"),
    ],
)
def test_wrong_field_types_are_named(field: str, value: object, want: str) -> None:
    body = _body(P.Submit("r", prompt="hi")) | {field: value}
    err = _decode_error(_frames(0x10, body))
    assert f"Submit.{field}" in err and f"expected {want}" in err


def test_nested_errors_carry_their_path() -> None:
    body = _body(P.Submit("r", prompt="hi"))
    body["sampling"]["top_k"] = "x"
    assert "Submit.sampling.top_k: expected int" in _decode_error(_frames(0x10, body))
    body = _body(P.Submit("r", prompt_ids=(1, 2)))
    body["prompt_ids"] = [1, "2"]
    assert "Submit.prompt_ids[1]: expected int" in _decode_error(_frames(0x10, body))


def test_float_fields_accept_ints_from_other_languages() -> None:
    body = _body(P.Submit("r", prompt="hi", timeout_s=2.0)) | {"timeout_s": 2}
    assert P.decode(_frames(0x10, body)).timeout_s == 2.0


def test_semantic_checks_run_on_decode() -> None:
    body = _body(P.Submit("r", prompt="hi")) | {"prompt_ids": [1]}
    assert "exactly one of prompt" in _decode_error(_frames(0x10, body))
    body = _body(P.Error("internal", "x")) | {"code": "made_up"}
    assert "unknown error code" in _decode_error(_frames(0x14, body))


def test_body_must_be_a_msgpack_map() -> None:
    assert "must be a msgpack map" in _decode_error(_frames(0x13, [1, 2]))
    assert "not valid msgpack" in _decode_error([b"\x13", b"\xc1"])
    assert "not valid msgpack" in _decode_error([b"\x13", P.encode(CANCEL)[1] + b"\x00"])
    assert "not valid msgpack" in _decode_error([b"\x13", P.encode(CANCEL)[1][:-2]])


def test_invalid_utf8_is_refused() -> None:
    body = P.encode(P.Submit("r", prompt="ab"))[1].replace(b"\xa2ab", b"\xa2\xff\xfe")
    assert "not valid msgpack" in _decode_error([b"\x10", body])


def test_msgpack_ext_types_are_refused() -> None:
    body = msgpack.packb({"v": P.PROTOCOL_VERSION, "req_id": msgpack.ExtType(1, b"x"),
                          "reason": ""})
    assert "ext" in _decode_error([b"\x13", body])


def test_msgpack_size_limits() -> None:
    big = P.encode(P.Submit("r", prompt="x" * 100))
    assert "not valid msgpack" in _decode_error(big, max_str_len=50)
    ids = P.encode(P.Submit("r", prompt_ids=tuple(range(100))))
    assert "not valid msgpack" in _decode_error(ids, max_array_len=50)
    assert "over the limit" in _decode_error(ids, max_body_bytes=64)


def test_json_fields_are_depth_limited() -> None:
    deep: object = 1
    for _ in range(40):
        deep = [deep]
    body = _body(P.Stats("s")) | {"stats": {"x": deep}}
    assert "nested too deeply" in _decode_error(_frames(0x16, body))


def test_pathological_msgpack_nesting_is_a_protocol_error() -> None:
    payload = b"\x91" * 100_000 + b"\x00"  # 100k nested one-element arrays
    assert "Cancel" in _decode_error([b"\x13", payload])


def test_json_field_refuses_non_json_on_encode() -> None:
    with pytest.raises(ProtocolError):
        P.encode(P.Stats("s", {"x": object()}))


def test_too_many_frames() -> None:
    frames = [*P.encode(CANCEL), b"x", b"y"]
    assert "exceed the limit" in _decode_error(frames, max_frames=3)


def test_unreferenced_frames_are_refused() -> None:
    assert "not referenced" in _decode_error([*P.encode(CANCEL), b"stray"])


def test_error_for_maps_exceptions_to_codes() -> None:
    from common.errors import Overloaded

    err = P.error_for(ProtocolError("bad frame", req_id="r1"))
    assert err == P.Error("protocol_error", "bad frame", "r1")
    err = P.error_for(Overloaded("queue full", retry_after_s=0.5), req_id="r2")
    assert err == P.Error("overloaded", "queue full", "r2", 0.5)
    assert P.error_for(KeyError("x")) == P.Error("internal", "KeyError: 'x'")
