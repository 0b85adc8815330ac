"""Tensors through the wire format: dtypes, odd shapes, zero-copy, strict frame checks."""

from __future__ import annotations

import subprocess
import sys

import msgpack
import numpy as np
import pytest
import torch
import zmq

from common import protocol as P
from common.errors import ProtocolError
from common.sockets import make_socket, recv_msg, send_msg
from common.tensorframe import WireTensor, to_wire
from common.tensormem import copy_bytes_into

torch.set_num_threads(1)


def _handoff(tensors: dict, threshold: int = 1024) -> list:
    kv = P.KVPayload("r", 1, 0, 1, 0, 1, 1, tensors)
    return P.encode(P.KVHandoff("r", "e", 1, 1, 1, P.Sampling(), kv), inline_threshold=threshold)


def _round_trip(t: object, threshold: int = 1024) -> WireTensor:
    return P.decode(_handoff({"t": t}, threshold)).kv.tensors["t"]


TORCH_CASES = {
    "bf16": lambda: torch.randn(4, 3, 5, 8).to(torch.bfloat16),
    "float32": lambda: torch.randn(7, 9),
    "int64": lambda: torch.arange(-50, 50, dtype=torch.int64).reshape(10, 10),
    "empty": lambda: torch.empty(2, 0, 3, dtype=torch.bfloat16),
    "zero_dim": lambda: torch.tensor(3.25),
    "non_contiguous": lambda: torch.randn(16, 32).to(torch.bfloat16).t()[::2],
    "bool": lambda: torch.rand(33) > 0.5,
    "float16": lambda: torch.randn(5).half(),
    "uint8": lambda: torch.arange(200, dtype=torch.uint8),
}


@pytest.mark.parametrize("threshold", [0, 1 << 30], ids=["frame", "inline"])
@pytest.mark.parametrize("case", sorted(TORCH_CASES))
def test_torch_round_trip(case: str, threshold: int) -> None:
    t = TORCH_CASES[case]()
    out = _round_trip(t, threshold).as_torch()
    assert out.dtype == t.dtype and out.shape == t.shape
    assert torch.equal(out, t)


def test_bf16_bits_survive_exactly() -> None:
    words = [0x7FC0, 0xFF80, 0x7F80, 0x0001, 0x8000, 0x3F80]
    bits = torch.tensor([w - (1 << 16) if w >= 1 << 15 else w for w in words], dtype=torch.int16)
    t = bits.view(torch.bfloat16)  # NaN, -inf, +inf, denormal, -0.0, 1.0
    out = _round_trip(t, 0)
    assert torch.equal(out.as_torch().view(torch.int16), bits)
    assert out.as_numpy().dtype == np.uint16  # raw bits without torch


@pytest.mark.parametrize(
    "arr",
    [
        np.arange(12, dtype=np.float64).reshape(3, 4).T,
        np.arange(10, dtype=">i4"),
        np.zeros((0,), np.float32),
        np.array(5, dtype=np.int8),
        np.arange(600, dtype=np.uint16),
    ],
    ids=["f64_transposed", "big_endian", "empty", "zero_dim", "uint16"],
)
def test_numpy_round_trip(arr: np.ndarray) -> None:
    out = _round_trip(arr, 16).as_numpy()
    assert out.shape == arr.shape
    assert np.array_equal(out, arr)


def test_wire_tensor_relays_without_torch_and_keeps_its_dtype() -> None:
    raw = np.full((2, 3), 0x3F80, np.uint16)
    wt = WireTensor.from_buffer("bfloat16", (2, 3), raw)
    again = _round_trip(_round_trip(wt, 0), 0)
    assert again.dtype == "bfloat16"
    assert torch.equal(again.as_torch(), torch.ones(2, 3, dtype=torch.bfloat16))


def test_large_tensors_go_as_their_own_frame_without_a_copy() -> None:
    t = torch.randn(256, 256)
    frames = _handoff({"k": t})
    assert len(frames) == 3
    frames[2][:4] = b"\x00\x00\x00\x00"  # the frame *is* the tensor's memory
    assert t[0, 0].item() == 0.0


def test_received_frames_are_viewed_then_copied_once_into_the_destination() -> None:
    ctx = zmq.Context()
    push = make_socket(ctx, "PUSH", bind="inproc://tf")
    pull = make_socket(ctx, "PULL", connect="inproc://tf")
    try:
        src = torch.randn(64, 128).to(torch.bfloat16)
        kv = P.KVPayload("r", 1, 0, 1, 0, 1, 1, {"k": src})
        send_msg(push, P.KVHandoff("r", "e", 1, 1, 1, P.Sampling(), kv))
        wt = recv_msg(pull).kv.tensors["k"]
        view = wt.as_torch()
        wt.buffer[:2] = b"\x80\x3f"  # writing through the frame shows in the view: no copy
        assert view.view(-1)[0].item() == 1.0
        dst = torch.zeros(64, 128, dtype=torch.bfloat16)
        wt.copy_into(dst)
        assert torch.equal(dst.view(-1)[1:], src.view(-1)[1:])
        with pytest.raises(ValueError, match="does not match"):
            wt.copy_into(torch.zeros(64, 128))
        dst_np = np.zeros((64, 128), np.uint16)
        assert np.array_equal(wt.copy_into(dst_np), wt.as_numpy())
    finally:
        push.close(0)
        pull.close(0)
        ctx.term()


def test_tensors_that_need_grad_or_are_negated_views_travel_by_value() -> None:
    grad = torch.arange(600.0, requires_grad=True) * 2
    assert torch.equal(_round_trip(grad, 0).as_torch(), grad.detach())
    neg = torch._neg_view(torch.arange(600.0))  # memory holds +x, the values are -x
    assert torch.equal(_round_trip(neg, 0).as_torch(), -torch.arange(600.0))


@pytest.mark.parametrize("source", ["frame", "bytes"])
def test_copy_into_contiguous_strided_and_wrong_destinations(source: str) -> None:
    src = torch.randn(6, 8).to(torch.bfloat16)
    frames = _handoff({"k": src}, 0)
    if source == "bytes":  # read-only buffers take the memoryview path, not ctypes
        frames = [bytes(memoryview(f).cast("B")) for f in frames]
    wt = P.decode(frames).kv.tensors["k"]
    assert torch.equal(wt.copy_into(torch.empty(6, 8, dtype=torch.bfloat16)), src)
    cache = torch.zeros(6, 16, dtype=torch.bfloat16)
    wt.copy_into(cache[:, 4:12])  # a strided slice of a bigger cache
    assert torch.equal(cache[:, 4:12], src) and not cache[:, :4].any()
    with pytest.raises(ValueError, match="does not match"):
        wt.copy_into(torch.empty(8, 6, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="needs a contiguous CPU tensor"):
        copy_bytes_into(torch.empty(8, 12, dtype=torch.bfloat16)[:, :6], wt.buffer)
    with pytest.raises(ValueError, match="destination has 4 bytes"):
        copy_bytes_into(torch.empty(2, dtype=torch.bfloat16), wt.buffer)


def test_unsupported_tensors_are_refused() -> None:
    with pytest.raises(ProtocolError, match="cannot travel"):
        to_wire(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(ProtocolError, match="cannot travel"):
        to_wire(np.zeros(2, np.complex64))
    with pytest.raises(ProtocolError, match="dense"):
        to_wire(torch.zeros(3, 3).to_sparse())
    with pytest.raises(ProtocolError, match="expected a tensor"):
        to_wire([1, 2, 3])


def test_wire_tensor_checks_its_buffer() -> None:
    with pytest.raises(ValueError, match="needs 12 bytes"):
        WireTensor.from_buffer("float32", (3,), b"\x00" * 8)
    with pytest.raises(ValueError, match="unknown dtype"):
        WireTensor.from_buffer("float8", (1,), b"\x00")


# ---------------------------------------------------------------- malformed tensor entries


def _tensor_frames(entry: object, *extra: bytes) -> list[bytes]:
    frames = _handoff({})
    body = msgpack.unpackb(frames[1])
    body["kv"]["tensors"] = {"k": entry}
    return [frames[0], msgpack.packb(body, use_bin_type=True), *extra]


def _error(frames: list, limits: P.Limits = P.DEFAULT_LIMITS) -> str:
    with pytest.raises(ProtocolError) as info:
        P.decode(frames, limits)
    return str(info.value)


@pytest.mark.parametrize(
    ("entry", "frames", "want"),
    [
        ({"dtype": "float32", "shape": [4], "frame": 2}, [b"\x00" * 12], "needs 16 bytes"),
        ({"dtype": "float32", "shape": [4], "frame": 3}, [b"\x00" * 16], "frame index 3"),
        ({"dtype": "float32", "shape": [4], "frame": 1}, [b"\x00" * 16], "frame index 1"),
        ({"dtype": "float32", "shape": [4], "frame": 2}, [], "frame index 2"),
        ({"dtype": "float32", "shape": [2], "data": b"\x00" * 7}, [], "needs 8 bytes"),
        ({"dtype": "float32", "shape": [2], "data": "text"}, [], "must be bytes"),
        ({"dtype": "complex", "shape": [1], "data": b""}, [], "unknown tensor dtype"),
        ({"dtype": "int8", "shape": [-1], "data": b""}, [], "non-negative ints"),
        ({"dtype": "int8", "shape": [1.0], "data": b"\x00"}, [], "non-negative ints"),
        ({"dtype": "int8", "shape": [1] * 9, "data": b"\x00"}, [], "at most 8"),
        ({"dtype": "int8", "shape": 3, "data": b"\x00"}, [], "at most 8"),
        ({"dtype": "int8", "shape": [1], "data": b"\x00", "x": 1}, [], "tensor keys"),
        ({"dtype": "int8", "shape": [1], "frame": 2, "data": b""}, [b"\x00"], "tensor keys"),
        ([1, 2], [], "must be a map"),
        ({"dtype": "int8", "shape": [2**40, 2**40], "frame": 2}, [b"\x00"], "needs"),
    ],
)
def test_malformed_tensor_entries(entry: object, frames: list[bytes], want: str) -> None:
    assert want in _error(_tensor_frames(entry, *frames))


def test_a_frame_referenced_twice_is_refused() -> None:
    frames = _handoff({"a": np.zeros(512, np.float32), "b": np.zeros(512, np.float32)})
    body = msgpack.unpackb(frames[1])
    body["kv"]["tensors"]["b"]["frame"] = 2
    assert "referenced twice" in _error([frames[0], msgpack.packb(body), frames[2], frames[3]])


def test_frames_over_the_size_limit_are_refused_before_use() -> None:
    frames = _handoff({"k": np.zeros(4096, np.uint8)})
    assert "over the limit of 1000" in _error(frames, P.Limits(max_frame_bytes=1000))


def test_coordinator_side_imports_no_torch() -> None:
    code = (
        "import sys, common.protocol, common.sockets, common.client, common.logs;"
        "from common import protocol as P; import numpy as np;"
        "kv = P.KVPayload('r', 1, 0, 1, 0, 1, 1, {'k': np.zeros(900, np.uint16)});"
        "m = P.decode(P.encode(P.KVHandoff('r', 'e', 1, 1, 1, P.Sampling(), kv)));"
        "assert m.kv.tensors['k'].nbytes == 1800;"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
