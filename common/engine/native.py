"""Hand-written bf16 decode kernels (``native/decode_bf16.c``), compiled with gcc on first use.

Why: at decode sizes (1-64 rows) torch's bf16 linears either read the weights slowly (oneDNN
at one row) or lose a lot of throughput at 8-32 rows, and CPU SDPA is slow for one query per
sequence over a ragged batch. The C kernels stream pre-packed weights, widened to fp32 in
AVX-512 registers with fp32 FMA accumulation (see the C file's header); ``native_layer.py``
runs a whole llama decoder layer from them in one call.

Availability: only on a CPU with ``avx512_bf16``, with gcc on the PATH, on Linux, and unless
``EXEGPT_NATIVE=0``. The shared library is cached under ``$EXEGPT_KERNEL_CACHE`` (default
``~/.cache/exegpt/kernels``) keyed by the source hash, the compiler and the CPU flags; it is
built into a temporary file and renamed atomically, so many workers starting at once are safe.
Anything missing or failing -> ``lib()`` returns None and callers keep the torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native") / "decode_bf16.c"
CFLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-pthread", "-fno-math-errno"]
MAX_ROWS = 64  # decode row counts the linear kernel takes (the C MAX_ROWS)
PANEL = 64  # output columns per packed panel (the C PANEL)

_lock = threading.Lock()
_state: dict[str, ctypes.CDLL | None] = {}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cache_dir() -> Path:
    return Path(os.environ.get("EXEGPT_KERNEL_CACHE")
                or Path.home() / ".cache" / "exegpt" / "kernels")


def _library_path(gcc: str) -> Path:
    version = subprocess.run([gcc, "--version"], capture_output=True, text=True,
                             timeout=30).stdout.splitlines()[:1]
    flags = sorted(f for f in _cpu_flags() if f.startswith(("avx", "fma", "amx")))
    key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(CFLAGS), *version,
                                    " ".join(flags)]).encode()).hexdigest()[:16]
    return _cache_dir() / f"decode_bf16-{key}.so"


def _build(gcc: str, target: Path) -> None:
    """Compile into a temporary file next to ``target``, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([gcc, *CFLAGS, str(SOURCE), "-o", tmp, "-lm"], check=True,
                       capture_output=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.exegpt_linear_bf16.argtypes = [p, i64, i32, i32, p, i32, p, p, p, i64, i32, i32]
    lib.exegpt_linear_bf16.restype = i32
    lib.exegpt_decode_attention_bf16.argtypes = [p, i64, i64, p, p, i64, i64, i64, p, p, p,
                                                 i64, p, i64, p, i32, i32, i32, i32, i32, f32,
                                                 i32]
    lib.exegpt_decode_attention_bf16.restype = i32
    lib.exegpt_rms_norm_bf16.argtypes = [p, i64, p, p, i32, i32, f32, i32]
    lib.exegpt_rms_norm_bf16.restype = i32
    lib.exegpt_rope_bf16.argtypes = [p, i64, i32, i32, i32, p, p]
    lib.exegpt_rope_bf16.restype = i32
    lib.exegpt_swiglu_bf16.argtypes = [p, i64, p, i32, i32]
    lib.exegpt_swiglu_bf16.restype = i32
    lib.exegpt_argmax_f32.argtypes = [p, i64, i32, i32, p]
    lib.exegpt_argmax_f32.restype = i32
    lib.exegpt_panel_width.restype = i32


def _load() -> ctypes.CDLL | None:
    if os.environ.get("EXEGPT_NATIVE", "1") == "0" or not sys.platform.startswith("linux"):
        return None
    gcc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("gcc")
    if gcc is None or "avx512_bf16" not in _cpu_flags():
        return None
    try:
        path = _library_path(gcc)
        if not path.exists():
            _build(gcc, path)
        lib = ctypes.CDLL(str(path))
        _declare(lib)
    except (OSError, subprocess.SubprocessError):
        return None
    if lib.exegpt_panel_width() != PANEL:
        return None
    return lib


def lib() -> ctypes.CDLL | None:
    """The loaded kernel library, or None when unavailable (built once per process)."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _state["lib"] = _load()
    return _state["lib"]


def usable(t: torch.Tensor) -> bool:
    """Whether a tensor is one the kernels take: bf16 on the CPU, with the library loaded."""
    return t.dtype == torch.bfloat16 and t.device.type == "cpu" and lib() is not None


def _threads() -> int:
    return max(1, min(8, torch.get_num_threads()))


@dataclass(frozen=True)
class PackedLinear:
    """A [N, K] bf16 weight re-laid out for the C kernel: panels of 64 output columns, each
    [K/2 pairs, 64 columns, 2] so one panel streams contiguously (padding is zero)."""

    data: torch.Tensor
    out_features: int
    in_features: int


def pack_linear(weight: torch.Tensor) -> PackedLinear | None:
    """The kernel layout of a 2-D bf16 CPU weight, or None when the kernel is unavailable."""
    if weight.dim() != 2 or not usable(weight):
        return None
    n, k = weight.shape
    panels, pairs = -(-n // PANEL), -(-k // 2)
    padded = torch.zeros(panels * PANEL, pairs * 2, dtype=torch.bfloat16)
    padded[:n, :k] = weight.detach()
    data = padded.view(panels, PANEL // 16, 16, pairs, 2).permute(0, 3, 1, 2, 4).contiguous()
    return PackedLinear(data=data, out_features=n, in_features=k)


def linear(x: torch.Tensor, packed: PackedLinear, bias: torch.Tensor | None = None,
           out_dtype: torch.dtype = torch.bfloat16, residual: torch.Tensor | None = None
           ) -> torch.Tensor | None:
    """x [M, K] bf16 (M <= MAX_ROWS) -> [M, N] in ``out_dtype`` (bf16 or float32, the fp32
    accumulators unrounded), plus ``residual`` [M, N] bf16 if given (added to the rounded
    output and rounded again: two bf16 ops, as unfused), or None when the kernel refuses."""
    kernels = lib()
    if kernels is None or x.dim() != 2 or x.shape[1] != packed.in_features:
        return None
    if x.dtype != torch.bfloat16 or not 1 <= x.shape[0] <= MAX_ROWS:
        return None
    if x.stride(1) != 1:
        x = x.contiguous()
    if bias is not None and (bias.dtype != torch.bfloat16 or not bias.is_contiguous()):
        return None
    m, n = x.shape[0], packed.out_features
    if residual is not None and (residual.shape != (m, n) or not residual.is_contiguous()
                                 or residual.dtype != torch.bfloat16
                                 or out_dtype != torch.bfloat16):
        return None
    y = torch.empty(m, n, dtype=out_dtype)
    rc = kernels.exegpt_linear_bf16(
        x.data_ptr(), x.stride(0), m, packed.in_features, packed.data.data_ptr(), n,
        None if bias is None else bias.data_ptr(),
        None if residual is None else residual.data_ptr(), y.data_ptr(), n,
        int(out_dtype == torch.float32), _threads())
    return y if rc == 0 else None


def _rows_ok(t: torch.Tensor | None, b: int, heads: int, d: int) -> bool:
    """[B, heads, D] bf16 with unit stride over D and head stride D (any sequence stride)."""
    return t is None or (t.dtype == torch.bfloat16 and tuple(t.shape) == (b, heads, d)
                         and t.stride(2) == 1 and (heads == 1 or t.stride(1) == d))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slots: torch.Tensor, lengths: torch.Tensor, scale: float,
                     k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None
                     ) -> torch.Tensor | None:
    """One query per sequence against its cache rows, float32 softmax and accumulation.

    q: [B, Hq, D] bf16 (unit stride over D); k_cache, v_cache: the whole [slots, Hkv, cap, D]
    buffers (same strides, unit stride over D); slots, lengths: int64 [B] (lengths count the
    positions to attend, the new one included); k_new, v_new: this step's [B, Hkv, D] rows,
    written into the cache at position length - 1 first (both or neither). Returns
    [B, Hq, D] bf16, or None if refused (then nothing was written)."""
    kernels = lib()
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    if kernels is None or q.stride(2) != 1 or k_cache.stride() != v_cache.stride():
        return None
    if k_cache.stride(3) != 1 or slots.dtype != torch.int64 or lengths.dtype != torch.int64:
        return None
    if (k_new is None) != (v_new is None) or not (_rows_ok(k_new, b, hkv, d)
                                                   and _rows_ok(v_new, b, hkv, d)):
        return None
    slots, lengths = slots.contiguous(), lengths.contiguous()
    out = torch.empty(b, hq, d, dtype=torch.bfloat16)
    rc = kernels.exegpt_decode_attention_bf16(
        q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), slots.data_ptr(),
        lengths.data_ptr(), None if k_new is None else k_new.data_ptr(),
        0 if k_new is None else k_new.stride(0), None if v_new is None else v_new.data_ptr(),
        0 if v_new is None else v_new.stride(0), out.data_ptr(), b, hq, hkv, d,
        k_cache.shape[2], scale, _threads())
    return out if rc == 0 else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """transformers' LlamaRMSNorm on bf16 rows [M, N] (normalise in fp32, round to bf16,
    multiply by the bf16 weight), or None when refused."""
    kernels = lib()
    if kernels is None or x.dim() != 2 or x.stride(1) != 1 or not weight.is_contiguous():
        return None
    rows, n = x.shape
    y = torch.empty(rows, n, dtype=torch.bfloat16)
    rc = kernels.exegpt_rms_norm_bf16(x.data_ptr(), x.stride(0), weight.data_ptr(), y.data_ptr(),
                                      rows, n, eps, _threads())
    return y if rc == 0 else None


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Rotate bf16 ``x`` [T, heads, D] (unit stride over heads x D) in place with bf16 tables
    [T, D] (sign-folded sin), each operation rounded as in transformers. False if refused."""
    kernels = lib()
    if kernels is None or x.dim() != 3 or x.stride(2) != 1 or x.stride(1) != x.shape[2]:
        return False
    if cos.dtype != torch.bfloat16 or sin.dtype != torch.bfloat16:
        return False
    cos, sin = cos.reshape(x.shape[0], x.shape[2]), sin.reshape(x.shape[0], x.shape[2])
    if not (cos.is_contiguous() and sin.is_contiguous()):
        return False
    return kernels.exegpt_rope_bf16(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1],
                                    x.shape[2], cos.data_ptr(), sin.data_ptr()) == 0


def swiglu(h: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up of bf16 ``h`` [M, 2F] = [gate | up], silu rounded to bf16 before the
    product (transformers' order), or None if refused."""
    kernels = lib()
    if kernels is None or h.dim() != 2 or h.stride(1) != 1 or h.shape[1] % 2:
        return None
    rows, f = h.shape[0], h.shape[1] // 2
    y = torch.empty(rows, f, dtype=torch.bfloat16)
    rc = kernels.exegpt_swiglu_bf16(h.data_ptr(), h.stride(0), y.data_ptr(), rows, f)
    return y if rc == 0 else None


def argmax(x: torch.Tensor) -> torch.Tensor | None:
    """``x.argmax(-1)`` of float32 CPU logits [B, V] (first maximal index, NaN maximal), one
    vectorised pass per row, or None when refused."""
    kernels = lib()
    if kernels is None or x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    if x.stride(1) != 1 or x.shape[0] < 1 or x.shape[1] < 1:
        return None
    out = torch.empty(x.shape[0], dtype=torch.int64)
    rc = kernels.exegpt_argmax_f32(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1],
                                   out.data_ptr())
    return out if rc == 0 else None
