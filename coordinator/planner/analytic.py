"""Analytic profiles: a roofline of a GPU we do not have, written as the measured-table format.

Each op costs ``max(FLOPs / (peak * eff_flops), bytes / (hbm * eff_mem)) + launch``; links cost
``alpha + bytes / (link * eff_link)``; a ring all-reduce over tp GPUs costs
``2 (tp-1) alpha + 2 (tp-1)/tp * bytes / (link * eff_link)``. The formulas and the datasheet
numbers are in docs/planner.md ("Analytic profiles"). The output goes through the same
interpolating :class:`Profile` as a measured one, so the simulator cannot tell them apart.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass
from typing import Any

from common.models.config import ModelConfig
from coordinator.planner.profile import DTYPE_BYTES, Profile


@dataclass(frozen=True)
class GPUSpec:
    """Datasheet numbers (dense tensor-core peak, per-direction link bandwidth)."""

    name: str
    peak_flops: float  # fp16/bf16 dense tensor FLOP/s
    hbm_bytes_s: float
    memory_bytes: float
    tp_link_bytes_s: float  # GPU<->GPU inside a TP group (NVLink or PCIe), one direction
    stage_link_bytes_s: float  # stage-to-stage activations
    host_link_bytes_s: float  # PCIe to host (KV handoff is staged through host memory)
    link_latency_s: float
    eff_flops: float = 0.6
    eff_mem: float = 0.8
    eff_link: float = 0.8
    launch_s: float = 8e-6  # per kernel


GPUS: dict[str, GPUSpec] = {
    # NVIDIA A40 datasheet: 149.7 TFLOPS FP16 tensor (dense), 48 GB GDDR6 at 696 GB/s,
    # PCIe Gen4 x16 (64 GB/s both directions). The paper's A40 servers have no NVLink switch.
    "a40": GPUSpec("NVIDIA A40 48GB", 149.7e12, 696e9, 48e9, 32e9, 32e9, 32e9, 10e-6),
    # A100 SXM4 80GB: 312 TFLOPS FP16 dense, 2,039 GB/s HBM2e, NVLink 600 GB/s both directions.
    "a100": GPUSpec("NVIDIA A100-SXM4 80GB", 312e12, 2039e9, 80e9, 300e9, 300e9, 32e9, 5e-6),
    # H100 SXM5: 989.4 TFLOPS FP16 dense, 3.35 TB/s HBM3, NVLink 900 GB/s, PCIe Gen5.
    "h100": GPUSpec("NVIDIA H100-SXM5 80GB", 989.4e12, 3.35e12, 80e9, 450e9, 450e9, 64e9, 4e-6),
}

BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
SEQ_LENS = [1, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
TOKENS = sorted({int(2 ** (k / 2)) for k in range(0, 37)})  # 1 .. 262144, sqrt(2) steps
BYTES = [2**k for k in range(10, 34)]  # 1 KiB .. 8 GiB


@dataclass(frozen=True)
class _Roofline:
    gpu: GPUSpec
    model: ModelConfig
    dtype_bytes: int

    def compute(self, flops: float, bytes_moved: float, kernels: int) -> float:
        g = self.gpu
        return (max(flops / (g.peak_flops * g.eff_flops), bytes_moved / (g.hbm_bytes_s * g.eff_mem))
                + kernels * g.launch_s)

    def link(self, nbytes: float, bandwidth: float) -> float:
        return self.gpu.link_latency_s + nbytes / (bandwidth * self.gpu.eff_link)

    def rest(self, kind: str, tp: int, tokens: int) -> float:
        m, d = self.model, self.dtype_bytes
        params = m.params_per_layer(kind) / tp
        act = tokens * d * (6 * m.hidden_size + 2 * m.ffn_size / tp)
        return self.compute(2.0 * tokens * params, params * d + act, kernels=8)

    def enc_attn(self, tp: int, batch: int, seq: int) -> float:
        m, d = self.model, self.dtype_bytes
        causal = 0.5 if not m.is_encoder_decoder else 1.0  # prefill skips the masked half
        flops = 4.0 * batch * seq * seq * m.q_size / tp * causal
        io = batch * seq * (2 * m.q_size + 2 * m.kv_size) * d / tp
        return self.compute(flops, io, kernels=2)

    def dec_attn(self, tp: int, batch: int, ctx: int) -> float:
        m, d = self.model, self.dtype_bytes
        flops = 4.0 * batch * ctx * m.q_size / tp
        io = batch * ctx * 2 * m.kv_size * d / tp + batch * 2 * m.q_size * d / tp
        return self.compute(flops, io, kernels=2)

    def embed(self, tp: int, tokens: int) -> float:
        return self.compute(0.0, tokens * self.model.hidden_size * self.dtype_bytes * 2, 2)

    def lm_head(self, tp: int, tokens: int) -> float:
        m, d = self.model, self.dtype_bytes
        w = m.vocab_size * m.hidden_size / tp
        return self.compute(2.0 * tokens * w, w * d + tokens * m.vocab_size / tp * d, kernels=3)

    def allreduce(self, tp: int, nbytes: int) -> float:
        g = self.gpu
        steps = 2 * (tp - 1)
        return steps * g.link_latency_s + steps / tp * nbytes / (g.tp_link_bytes_s * g.eff_link)


def analytic_profile(gpu: str, model: ModelConfig, dtype: str = "float16",
                     tp_sizes: tuple[int, ...] = (1, 2, 4, 8)) -> Profile:
    """Rows on the same grids a measured profile uses, from the roofline of ``gpu``."""
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r} for an analytic profile; known: {sorted(GPUS)}")
    if dtype not in ("float16", "bfloat16"):
        raise ValueError(f"analytic profiles model tensor-core fp16/bf16, not {dtype}")
    roof = _Roofline(GPUS[gpu], model, DTYPE_BYTES[dtype])
    enc_kind = "encoder" if model.is_encoder_decoder else "decoder"
    rows: list[dict[str, Any]] = []

    def add(op: str, tp: int, time_s: float, *, batch: int = 0, seq_len: int = 0,
            tokens: int = 0, nbytes: int = 0) -> None:
        rows.append({"op": op, "tp": tp, "batch": batch, "seq_len": seq_len, "tokens": tokens,
                     "bytes": nbytes, "time_s": time_s})

    for tp in tp_sizes:
        for b in BATCHES:
            for s in SEQ_LENS:
                add("enc_layer_attn", tp, roof.enc_attn(tp, b, s), batch=b, seq_len=s)
                add("dec_layer_attn", tp, roof.dec_attn(tp, b, s), batch=b, seq_len=s)
        for n in TOKENS:
            add("enc_layer_rest", tp, roof.rest(enc_kind, tp, n), tokens=n)
            add("dec_layer_rest", tp, roof.rest("decoder", tp, n), tokens=n)
            add("embed", tp, roof.embed(tp, n), tokens=n)
            add("lm_head", tp, roof.lm_head(tp, n), tokens=n)
        if tp > 1:
            for nb in BYTES:
                add("allreduce", tp, roof.allreduce(tp, nb), nbytes=nb)
    for nb in BYTES:
        add("stage_send", 1, roof.link(nb, roof.gpu.stage_link_bytes_s), nbytes=nb)
        add("kv_handoff", 1, 2 * roof.gpu.link_latency_s
            + nb / (roof.gpu.host_link_bytes_s * roof.gpu.eff_link), nbytes=nb)
    meta = {
        "device": f"analytic:{gpu} ({GPUS[gpu].name})", "dtype": dtype, "torch_version": None,
        "num_threads": 0, "model": model.to_dict(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "source": f"analytic:{gpu}", "memory_bytes": GPUS[gpu].memory_bytes,
        "gpu": asdict(GPUS[gpu]),
    }
    return Profile(meta=meta, rows=rows)


def parse_profile_arg(text: str, dtype: str | None = None) -> Profile:
    """``analytic:GPU:MODEL[:DTYPE]`` (e.g. ``analytic:a40:opt-13b``) or a profile JSON path."""
    if text.startswith("analytic:"):
        parts = text.split(":")
        if len(parts) not in (3, 4):
            raise ValueError(f"{text!r}: use analytic:GPU:MODEL[:DTYPE], e.g. analytic:a40:opt-13b")
        model = ModelConfig.preset(parts[2])
        prof_dtype = parts[3] if len(parts) == 4 else (dtype or "float16")
        return analytic_profile(parts[1], model, prof_dtype)
    return Profile.load(text, dtype=dtype)
