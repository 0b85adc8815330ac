"""A whole llama decoder layer in one C call (``exegpt_llama_layer_bf16`` in
``native/decode_bf16.c``) for bf16 decode steps on a CPU with the kernels.

Why: a decode layer is ~10 kernel calls; each costs ~5 us of Python checks, tensor
allocation and ctypes marshalling, a tenth of a batch-1 step for SmolLM2-135M. The fused call
runs the same kernels in the same order (identical numbers), with scratch buffers allocated
once per step and shared by the layers.

``LayerWeights.of(...)`` is built once per layer (None when the layer does not fit: not llama
style, tensor parallel, weights not packed for the kernels); ``StepPlan.build(...)`` once per
decode step (None when the step does not fit); ``run_layer`` returns None when the kernel
refuses, with nothing written, and the caller runs the unfused path.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from common.engine import native

_p, _i, _f, _i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_int64


class _Weights(ctypes.Structure):
    _fields_ = [(n, _p) for n in ("norm1", "norm2", "qkv", "qkv_bias", "o", "o_bias", "up",
                                  "up_bias", "down", "down_bias")]


class _Step(ctypes.Structure):
    _fields_ = [*[(n, _i) for n in ("m", "hidden", "hq", "hkv", "d", "ffn", "capacity",
                                    "nthreads")],
                ("eps", _f), ("scale", _f),
                *[(n, _p) for n in ("cos", "sin", "slots", "lens")],
                *[(n, _i64) for n in ("c_ss", "c_sh", "c_sl")],
                *[(n, _p) for n in ("normed", "qkv_out", "attn", "mid", "gate_up", "act")]]


def _declare(lib: ctypes.CDLL) -> ctypes._CFuncPtr | None:
    fn = getattr(lib, "exegpt_llama_layer_bf16", None)
    if fn is not None:
        fn.argtypes = [ctypes.POINTER(_Weights), ctypes.POINTER(_Step), _p, _p, _p, _p]
        fn.restype = _i
    return fn


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


@dataclass(frozen=True)
class LayerShape:
    """What a fused layer needs to know besides its weights."""

    hidden: int
    hq: int
    hkv: int
    head_dim: int
    ffn: int  # local gate (= up) width
    eps: float
    scale: float


class LayerWeights:
    """One layer's weight pointers for the fused kernel; holds the tensors alive."""

    def __init__(self, shape: LayerShape, tensors: dict[str, torch.Tensor | None]) -> None:
        self.shape = shape
        self._tensors = tensors  # keep every pointed-to tensor alive
        self.struct = _Weights(**{k: _ptr(v) for k, v in tensors.items()})

    @staticmethod
    def of(shape: LayerShape, norm1: torch.Tensor, norm2: torch.Tensor,
           linears: dict[str, tuple[object, torch.Tensor | None]]) -> LayerWeights | None:
        """``linears``: name -> (decode weight, bias) for qkv, o, up, down; None unless every
        one is packed for the C kernel and every tensor is a contiguous bf16 CPU tensor."""
        lib = native.lib()
        if lib is None or _declare(lib) is None:
            return None
        tensors: dict[str, torch.Tensor | None] = {"norm1": norm1, "norm2": norm2}
        for name, (packed, bias) in linears.items():
            if not isinstance(packed, native.PackedLinear):
                return None
            tensors[name], tensors[name + "_bias"] = packed.data, bias
        for t in tensors.values():
            if t is not None and not (t.dtype == torch.bfloat16 and t.device.type == "cpu"
                                      and t.is_contiguous()):
                return None
        return LayerWeights(shape, tensors)


class StepPlan:
    """Per decode step: scratch rows, RoPE tables, slots and lengths for every fused layer."""

    def __init__(self, shape: LayerShape, m: int, cos: torch.Tensor, sin: torch.Tensor,
                 slots: torch.Tensor, lens: torch.Tensor, cache_k: torch.Tensor) -> None:
        d, hq, hkv, h, f = shape.head_dim, shape.hq, shape.hkv, shape.hidden, shape.ffn
        bf = torch.bfloat16
        self._keep = [cos, sin, slots, lens]
        scratch = {"normed": torch.empty(m, h, dtype=bf),
                   "qkv_out": torch.empty(m, (hq + 2 * hkv) * d, dtype=bf),
                   "attn": torch.empty(m, hq * d, dtype=bf), "mid": torch.empty(m, h, dtype=bf),
                   "gate_up": torch.empty(m, 2 * f, dtype=bf), "act": torch.empty(m, f, dtype=bf)}
        self._keep += list(scratch.values())
        self.m, self.hidden = m, h
        self.struct = _Step(
            m=m, hidden=h, hq=hq, hkv=hkv, d=d, ffn=f, capacity=cache_k.shape[2],
            nthreads=native._threads(), eps=shape.eps, scale=shape.scale,
            cos=cos.data_ptr(), sin=sin.data_ptr(), slots=slots.data_ptr(),
            lens=lens.data_ptr(), c_ss=cache_k.stride(0), c_sh=cache_k.stride(1),
            c_sl=cache_k.stride(2), **{k: v.data_ptr() for k, v in scratch.items()})
        self.fn = _declare(native.lib())  # type: ignore[arg-type]

    @staticmethod
    def build(shape: LayerShape, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
              lens: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor
              ) -> StepPlan | None:
        """None unless the step fits the fused kernel: bf16 CPU tables [m, D] (any leading
        view), int64 slots/lengths, a [slots, Hkv, cap, D] cache with unit stride over D."""
        lib = native.lib()
        m = slots.shape[0]
        if lib is None or _declare(lib) is None or not 1 <= m <= native.MAX_ROWS:
            return None
        cos, sin = cos.reshape(m, -1), sin.reshape(m, -1)
        if not (cos.dtype == sin.dtype == torch.bfloat16 and cos.shape[1] == shape.head_dim
                and cos.is_contiguous() and sin.is_contiguous()):
            return None
        if slots.dtype != torch.int64 or lens.dtype != torch.int64 or lens.shape != slots.shape:
            return None
        if cache_k.dtype != torch.bfloat16 or cache_k.stride() != cache_v.stride() \
                or cache_k.stride(3) != 1 or cache_k.shape[1] != shape.hkv:
            return None
        return StepPlan(shape, m, cos, sin, slots.contiguous(), lens.contiguous(), cache_k)

    def run_layer(self, weights: LayerWeights, x: torch.Tensor, cache_k: torch.Tensor,
                  cache_v: torch.Tensor) -> torch.Tensor | None:
        """The layer's output for x [m, H] (a new tensor), or None if the kernel refused."""
        if x.dtype != torch.bfloat16 or x.shape != (self.m, self.hidden) \
                or not x.is_contiguous():
            return None
        out = torch.empty(self.m, self.hidden, dtype=torch.bfloat16)
        rc = self.fn(ctypes.byref(weights.struct), ctypes.byref(self.struct), x.data_ptr(),
                     out.data_ptr(), cache_k.data_ptr(), cache_v.data_ptr())
        return out if rc == 0 else None
