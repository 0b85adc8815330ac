"""Raw memory of CPU torch tensors: a flat byte view, and the one copy into a tensor.

Why a module of its own: these two sit on the hot path of every KV handoff (the sender's
frame is `tensor_bytes` of the tensor, the receiver's copy is `copy_bytes_into`), and both
avoid torch's view/numpy calls, which go through the dispatcher and cost tens of µs each when
the caches are cold, as they are between megabyte-sized messages (docs/wire.md). torch is
never imported here: callers pass tensors, so it is loaded already.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

__all__ = ["tensor_bytes", "copy_bytes_into"]


class _TensorMemory:
    """A contiguous CPU tensor's bytes as numpy's array interface, holding the tensor.

    Why not `t.view(...).numpy()`: torch's view and numpy bridge run through the dispatcher,
    which costs tens of µs per call when the caches are cold (as they are between
    megabyte-sized messages); numpy reads this interface in a few. The array numpy makes
    keeps this object, and so the tensor, alive for as long as any view of it exists.
    """

    __slots__ = ("__array_interface__", "tensor")

    def __init__(self, t: Any, nbytes: int) -> None:
        self.tensor = t
        self.__array_interface__ = {
            "data": (t.data_ptr(), False), "shape": (nbytes,), "typestr": "|u1", "version": 3,
        }


def tensor_bytes(t: Any, nbytes: int | None = None) -> memoryview:
    """A flat byte view (writable, no copy) of a contiguous CPU torch tensor's memory
    (grad or not: the bytes are read as they are); `nbytes` if the caller knows it."""
    n = t.nbytes if nbytes is None else nbytes
    if not n:
        return memoryview(bytearray())
    return memoryview(np.asarray(_TensorMemory(t, n)))


def copy_bytes_into(dst: Any, data: memoryview) -> None:
    """The one copy on the receiving side: raw bytes into a contiguous CPU torch tensor.

    A plain memcpy (ctypes.memmove to dst.data_ptr()): about twice as fast as torch's copy_
    from a freshly received (cache-cold) frame, and without the torch view/numpy calls that
    cost tens of µs each when the interpreter's caches are cold (docs/wire.md).
    """
    n = data.nbytes
    if dst.nbytes != n:
        raise ValueError(f"destination has {dst.nbytes} bytes, the data {n}")
    if not dst.is_cpu or not dst.is_contiguous() or dst.requires_grad:
        raise ValueError("copy_bytes_into needs a contiguous CPU tensor without grad")
    if not n:
        return
    if data.readonly or not data.c_contiguous:
        view = tensor_bytes(dst)  # bytes-like sources (no writable export for ctypes)
        view[:] = data if data.ndim == 1 and data.format == "B" else data.cast("B")
        return
    ctypes.memmove(dst.data_ptr(), ctypes.addressof(ctypes.c_char.from_buffer(data)), n)
