"""Tensors on the wire: one msgpack body entry plus (for large tensors) one raw ZMQ frame.

Why this shape: the body stays small and strictly typed while the bytes of a large tensor
travel as their own frame, sent with `copy=False` and received as a zero-copy view, so the
only copy on the receiving side is the one into the tensor's destination (the KV cache).

    encode side                              decode side
    torch/numpy/WireTensor                   body entry + frames
      -> contiguous, little-endian             -> checks dtype, shape, byte length, limits
      -> entry {"dtype","shape","frame"}       -> WireTensor (memoryview over the frame)
         + frame = the tensor's own memory        .as_numpy() / .as_torch()  zero-copy views
      or entry {"dtype","shape","data"}           .copy_into(dst)            the one copy
         (inline bytes, small tensors)

torch is optional: nothing here imports it until a torch tensor is encoded or `.as_torch()`
is called, so the coordinator (which relays requests and never decodes KV) stays torch-free.
bfloat16 has no numpy dtype: it travels as raw 2-byte words and `.as_numpy()` shows those
words as uint16; `.as_torch()` rebuilds the real bfloat16 tensor.
"""

from __future__ import annotations

import functools
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.errors import ProtocolError
from common.tensormem import copy_bytes_into, tensor_bytes

# name -> (itemsize, numpy dtype used to view the bytes; bfloat16 shows its raw bits as uint16)
DTYPES: dict[str, tuple[int, str]] = {
    "bool": (1, "|b1"),
    "uint8": (1, "|u1"),
    "int8": (1, "|i1"),
    "uint16": (2, "<u2"),
    "int16": (2, "<i2"),
    "uint32": (4, "<u4"),
    "int32": (4, "<i4"),
    "uint64": (8, "<u8"),
    "int64": (8, "<i8"),
    "float16": (2, "<f2"),
    "bfloat16": (2, "<u2"),
    "float32": (4, "<f4"),
    "float64": (8, "<f8"),
}

_NUMPY_NAMES: dict[str, str] = {
    np.dtype(v).str: k for k, (_, v) in DTYPES.items() if k != "bfloat16"
}
_TENSOR_KEYS_FRAME = frozenset(("dtype", "shape", "frame"))
_TENSOR_KEYS_INLINE = frozenset(("dtype", "shape", "data"))

DEFAULT_INLINE_THRESHOLD = 1024
"""Tensors of at most this many bytes travel inline in the body (a frame costs more)."""


@dataclass(frozen=True, eq=False)
class WireTensor:
    """A received (or relayable) tensor: dtype name, shape, and a buffer of exactly its bytes.

    The buffer is a view over the received ZMQ frame (no copy). Re-encoding a WireTensor
    forwards the same buffer, so a process can relay tensors without importing torch.
    """

    dtype: str
    shape: tuple[int, ...]
    buffer: memoryview

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; use one of {sorted(DTYPES)}")
        if any(not isinstance(d, int) or d < 0 for d in self.shape):
            raise ValueError(f"shape must be non-negative ints, got {self.shape!r}")
        if self.buffer.nbytes != self.nbytes:
            raise ValueError(
                f"{self.dtype}{list(self.shape)} needs {self.nbytes} bytes, buffer has "
                f"{self.buffer.nbytes}"
            )

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype][0]

    @classmethod
    def from_buffer(cls, dtype: str, shape: tuple[int, ...] | list[int], data: Any) -> WireTensor:
        """Wrap raw little-endian bytes (e.g. bf16 KV made without torch) as a tensor."""
        view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
        return cls(dtype, tuple(shape), view)

    def as_numpy(self) -> np.ndarray:
        """Zero-copy numpy view (bfloat16 shows as its raw uint16 bits)."""
        return np.frombuffer(self.buffer, dtype=DTYPES[self.dtype][1]).reshape(self.shape)

    def as_torch(self) -> Any:
        """Zero-copy torch view over the received bytes (keeps the frame alive)."""
        import torch

        dtype = _torch_dtypes(torch)[self.dtype]
        if self.nbytes == 0:
            return torch.empty(self.shape, dtype=dtype)
        return _byte_view(torch, self.buffer).view(dtype).reshape(self.shape)

    def copy_into(self, dst: Any) -> Any:
        """Copy into an existing torch tensor or numpy array of the same shape and dtype."""
        if isinstance(dst, np.ndarray):
            src = self.as_numpy()
            if dst.shape != src.shape or dst.dtype != src.dtype:
                raise ValueError(
                    f"destination {dst.dtype}{list(dst.shape)} does not match "
                    f"{self.dtype}{list(self.shape)}"
                )
            np.copyto(dst, src)
            return dst
        import torch

        if dst.shape != self.shape or dst.dtype != _torch_dtypes(torch)[self.dtype]:
            raise ValueError(
                f"destination {dst.dtype}{list(dst.shape)} does not match "
                f"{self.dtype}{list(self.shape)}"
            )
        if not self.buffer.nbytes:
            return dst
        if dst.is_cpu and dst.is_contiguous() and not dst.requires_grad:
            copy_bytes_into(dst, self.buffer)
        else:
            dst.copy_(self.as_torch())  # strided destination (e.g. a slice of a KV cache)
        return dst

    def __repr__(self) -> str:
        return f"WireTensor({self.dtype}, shape={list(self.shape)}, nbytes={self.nbytes})"


def _byte_view(torch: Any, buffer: memoryview) -> Any:
    """uint8 tensor over the buffer, no copy (torch warns on read-only buffers such as
    bytes; callers never write through such a view)."""
    if not buffer.readonly:
        return torch.frombuffer(buffer, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buffer, dtype=torch.uint8)


def _numel(shape: tuple[int, ...] | list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@functools.cache
def _torch_dtypes(torch: Any) -> dict[str, Any]:
    return {
        "bool": torch.bool,
        "uint8": torch.uint8,
        "int8": torch.int8,
        "uint16": torch.uint16,
        "int16": torch.int16,
        "uint32": torch.uint32,
        "int32": torch.int32,
        "uint64": torch.uint64,
        "int64": torch.int64,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "float32": torch.float32,
        "float64": torch.float64,
    }


def is_tensor(value: Any) -> bool:
    """True for anything `to_wire` accepts (without importing torch)."""
    if isinstance(value, WireTensor | np.ndarray):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def to_wire(value: Any) -> WireTensor:
    """Any supported tensor -> WireTensor over contiguous little-endian memory.

    Copies only when it must (non-contiguous, big-endian or non-CPU input).
    """
    if isinstance(value, WireTensor):
        return value
    return _trusted(*_wire_parts(value))


def _wire_parts(value: Any) -> tuple[str, tuple[int, ...], memoryview]:
    """(dtype name, shape, flat byte view) of any supported tensor."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):  # the data plane's case first
        return _torch_parts(torch, value)
    if isinstance(value, WireTensor):
        return value.dtype, value.shape, value.buffer
    if isinstance(value, np.ndarray):
        return _numpy_parts(value)
    raise ProtocolError(
        f"expected a tensor (torch, numpy or WireTensor), got {type(value).__name__}"
    )


def _numpy_parts(arr: np.ndarray) -> tuple[str, tuple[int, ...], memoryview]:
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    name = _NUMPY_NAMES.get(arr.dtype.str)
    if name is None:
        raise ProtocolError(f"numpy dtype {arr.dtype} cannot travel; use one of {sorted(DTYPES)}")
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")  # np.ascontiguousarray would turn 0-d into 1-d
    raw = memoryview(arr.reshape(-1).view(np.uint8))
    return name, tuple(int(d) for d in arr.shape), raw


@functools.cache
def _torch_names(torch: Any) -> dict[Any, str]:
    return {v: k for k, v in _torch_dtypes(torch).items()}


def _torch_parts(torch: Any, t: Any) -> tuple[str, tuple[int, ...], memoryview]:
    """Few torch calls on purpose: each costs µs when the caches are cold (tensor_bytes)."""
    name = _torch_names(torch).get(t.dtype)
    if name is None:
        raise ProtocolError(f"torch dtype {t.dtype} cannot travel; use one of {sorted(DTYPES)}")
    if t.layout != torch.strided:
        raise ProtocolError(f"only dense tensors can travel, got layout {t.layout}")
    if not t.is_cpu:
        t = t.detach().cpu()
    if not t.is_contiguous():
        t = t.detach().contiguous()
    if t.is_neg():  # a lazily negated view: its memory does not hold its values
        t = t.detach().resolve_neg()
    shape = tuple(t.shape)
    return name, shape, tensor_bytes(t, _numel(shape) * DTYPES[name][0])


def encode_tensor(value: Any, frames: list[Any], first_frame: int, inline_threshold: int) -> dict:
    """Body entry for one tensor; appends its bytes to `frames` unless it is small enough.

    `first_frame` is the multipart index of frames[0] (2: after the type byte and the body).
    """
    name, shape, buf = _wire_parts(value)
    if buf.nbytes <= inline_threshold:
        return {"dtype": name, "shape": list(shape), "data": buf.tobytes()}
    frames.append(buf)
    return {"dtype": name, "shape": list(shape), "frame": first_frame + len(frames) - 1}


def decode_tensor(
    entry: Any, frames: list[memoryview], used: list[bool], path: str, max_ndim: int
) -> WireTensor:
    """Check one body entry against its frame and wrap it; every problem is a ProtocolError.

    `frames` is the whole multipart message as buffers (index = wire frame index); `used`
    marks frames already claimed so that each tensor frame is referenced exactly once.
    Written as one straight pass with few calls: it runs for every KV and hidden tensor.
    """
    if not isinstance(entry, dict):
        raise ProtocolError(f"{path}: a tensor must be a map, got {type(entry).__name__}")
    keys = entry.keys()
    inline = keys == _TENSOR_KEYS_INLINE
    if not inline and keys != _TENSOR_KEYS_FRAME:
        got = sorted(keys, key=repr)  # keys may mix str and bytes
        raise ProtocolError(
            f"{path}: tensor keys must be dtype, shape and frame (or data), got {got}"
        )
    dtype, shape = entry["dtype"], entry["shape"]
    info = DTYPES.get(dtype) if isinstance(dtype, str) else None
    if info is None:
        raise ProtocolError(f"{path}: unknown tensor dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > max_ndim:
        raise ProtocolError(f"{path}: tensor shape must be a list of at most {max_ndim} ints")
    expected = info[0]
    for d in shape:
        if type(d) is not int or d < 0:
            raise ProtocolError(f"{path}: tensor shape {shape!r} must hold non-negative ints")
        expected *= d
    if inline:
        data = entry["data"]
        if not isinstance(data, bytes):
            raise ProtocolError(f"{path}: inline tensor data must be bytes")
        buf = memoryview(bytearray(data))  # writable, so as_torch() needs no copy later
    else:
        buf = _claim_frame(entry["frame"], frames, used, path)
    if buf.nbytes != expected:
        raise ProtocolError(
            f"{path}: {dtype}{shape} needs {expected} bytes but its data has {buf.nbytes}"
        )
    return _trusted(dtype, tuple(shape), buf)


def _trusted(dtype: str, shape: tuple[int, ...], buf: memoryview) -> WireTensor:
    """A WireTensor whose fields the caller has already checked (skips __post_init__)."""
    wt = object.__new__(WireTensor)
    object.__setattr__(wt, "__dict__", {"dtype": dtype, "shape": shape, "buffer": buf})
    return wt


def _claim_frame(index: Any, frames: list[memoryview], used: list[bool], path: str) -> memoryview:
    if type(index) is not int or not 2 <= index < len(frames):
        raise ProtocolError(
            f"{path}: tensor frame index {index!r} is not one of the {len(frames) - 2} "
            f"tensor frames (indices 2..{len(frames) - 1})"
        )
    if used[index]:
        raise ProtocolError(f"{path}: tensor frame {index} is referenced twice")
    used[index] = True
    return frames[index]
