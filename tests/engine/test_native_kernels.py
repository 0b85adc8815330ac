"""The C decode kernels (common/engine/native.py) against torch on the same bf16 inputs.

Tolerances: the kernels accumulate in float32 like oneDNN, in another order, then round once to
bf16, so a result may differ from torch's by one bf16 rounding step (relative 2^-8) of the
larger operand magnitudes; the references here are float32 computations on the same bf16
inputs. Skipped where the kernels cannot be built (no gcc or no AVX-512 BF16).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common.engine import kernels, native

torch.set_num_threads(1)
pytestmark = pytest.mark.skipif(native.lib() is None,
                                reason="C kernels unavailable (gcc or avx512_bf16 missing)")


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 2 ** -7) -> None:
    scale = expected.abs().max().clamp_min(1e-6)
    err = (actual.float() - expected).abs().max() / scale
    assert err <= rel, f"relative error {float(err):.2e} > {rel:.2e}"


@pytest.mark.parametrize("n,k", [(33, 17), (64, 64), (70, 130), (200, 1), (129, 257)])
@pytest.mark.parametrize("threads", [1, 2])
def test_linear_matches_float32_matmul(n: int, k: int, threads: int) -> None:
    gen = torch.Generator().manual_seed(n * 1000 + k)
    w = torch.randn(n, k, generator=gen).bfloat16()
    bias = torch.randn(n, generator=gen).bfloat16()
    packed = native.pack_linear(w)
    assert packed is not None
    torch.set_num_threads(threads)
    try:
        for m in [*range(1, 34), 64]:
            x = torch.randn(m, k, generator=gen).bfloat16()
            ref = x.float() @ w.float().t() + bias.float()
            y = native.linear(x, packed, bias)
            assert y is not None and y.dtype == torch.bfloat16 and y.shape == (m, n)
            _close(y, ref)
            y32 = native.linear(x, packed, None, torch.float32)
            assert y32 is not None and y32.dtype == torch.float32
            _close(y32, x.float() @ w.float().t(), rel=1e-5)
    finally:
        torch.set_num_threads(1)


def test_linear_strided_rows_and_refusals() -> None:
    w = torch.randn(96, 40).bfloat16()
    packed = native.pack_linear(w)
    assert packed is not None
    wide = torch.randn(5, 100).bfloat16()
    x = wide[:, 10:50]  # row stride 100, unit column stride
    _close(native.linear(x, packed), x.float() @ w.float().t())  # type: ignore[arg-type]
    assert native.linear(torch.randn(65, 40).bfloat16(), packed) is None  # too many rows
    assert native.linear(torch.randn(2, 41).bfloat16(), packed) is None  # wrong K
    assert native.linear(torch.randn(2, 40), packed) is None  # float32 input
    assert native.pack_linear(torch.randn(8, 8)) is None  # float32 weight: not packed


def test_engine_linear_uses_kernel_and_falls_back_for_prefill() -> None:
    w = torch.randn(48, 32).bfloat16()
    packed = kernels.pack_for_decode(w)
    assert isinstance(packed, native.PackedLinear)
    for m in (1, 7, 200):  # 200 rows: the plain oneDNN F.linear path
        x = torch.randn(m, 32).bfloat16()
        _close(kernels.linear(x, w, None, packed), x.float() @ w.float().t())
    logits = kernels.logits_linear(torch.randn(150, 32).bfloat16(), w, packed)
    assert logits.dtype == torch.float32 and logits.shape == (150, 48)


@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (4, 4, 32), (8, 2, 128), (4, 2, 16),
                                      (2, 1, 48)])
def test_decode_attention_ragged_matches_float32(hq: int, hkv: int, d: int) -> None:
    gen = torch.Generator().manual_seed(hq + d)
    slots_total, cap = 7, 80
    k_cache = torch.randn(slots_total, hkv, cap, d, generator=gen).bfloat16()
    v_cache = torch.randn(slots_total, hkv, cap, d, generator=gen).bfloat16()
    slots = torch.tensor([5, 0, 3, 6])
    lengths = torch.tensor([1, 17, 80, 33])
    qkv = torch.randn(4, hq + 2 * hkv, d, generator=gen).bfloat16()
    q = qkv[:, :hq]  # a strided view, as the engine passes it
    scale = d ** -0.5
    out = native.decode_attention(q, k_cache, v_cache, slots, lengths, scale)
    assert out is not None and out.shape == (4, hq, d)
    for i, (slot, n) in enumerate(zip(slots.tolist(), lengths.tolist(), strict=True)):
        keys = k_cache[slot, :, :n].float().repeat_interleave(hq // hkv, dim=0)
        values = v_cache[slot, :, :n].float().repeat_interleave(hq // hkv, dim=0)
        ref = F.scaled_dot_product_attention(q[i].float().unsqueeze(1), keys, values,
                                             scale=scale).squeeze(1)
        _close(out[i], ref)


def test_rms_norm_follows_transformers_order() -> None:
    x = (torch.randn(37, 200) * 3).bfloat16()
    w = torch.randn(200).bfloat16()
    y = native.rms_norm(x, w, 1e-5)
    wide = x.float()
    normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + 1e-5)
    expected = w * normed.to(torch.bfloat16)  # LlamaRMSNorm in bf16
    assert y is not None
    mismatched = (y != expected).float().mean()
    assert mismatched < 0.01  # a rare last-bit tie from the float32 sum order
    _close(y, expected.float(), rel=2 ** -8)


def test_rope_and_swiglu_match_torch_bf16_ops() -> None:
    from common.models.layers import Rope

    rope = Rope(64, 10000.0, 300, "cpu")
    positions = torch.tensor([0, 5, 299])
    cos, sin = rope.tables(positions, torch.bfloat16)
    x = torch.randn(3, 12, 64).bfloat16()
    rotated = torch.roll(x, 32, dims=-1)
    expected = x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)  # transformers' roundings
    actual = x.clone()
    assert native.rope_(actual, cos, sin)
    assert torch.equal(actual, expected)
    h = (torch.randn(5, 2 * 300) * 4).bfloat16()
    gate, up = h.chunk(2, dim=-1)
    expected_mlp = F.silu(gate) * up
    got = native.swiglu(h)
    assert got is not None
    assert (got != expected_mlp).float().mean() < 0.01  # exp's last ulp may flip a rounding
    _close(got, expected_mlp.float(), rel=2 ** -8)


def test_disabled_kernels_fall_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(native._state, "lib", None)
    w = torch.randn(16, 16).bfloat16()
    assert native.pack_linear(w) is None
    packed = kernels.pack_for_decode(w)
    assert packed is None or isinstance(packed, torch.Tensor)  # the oneDNN copy
    x = torch.randn(2, 16).bfloat16()
    _close(kernels.linear(x, w, None, packed), x.float() @ w.float().t())


@pytest.mark.slow  # a second full gcc build (~4 s of CPU)
def test_build_is_cached_and_keyed(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    monkeypatch.setenv("EXEGPT_KERNEL_CACHE", str(tmp_path))
    gcc = shutil.which("gcc")
    assert gcc is not None
    path = native._library_path(gcc)
    assert path.parent == tmp_path and path.name.startswith("decode_bf16-")
    native._build(gcc, path)
    assert path.is_file() and not list(path.parent.glob("*.tmp"))


def test_linear_residual_is_two_rounded_adds() -> None:
    w = torch.randn(80, 48).bfloat16()
    packed = native.pack_linear(w)
    assert packed is not None
    x, res = torch.randn(3, 48).bfloat16(), torch.randn(3, 80).bfloat16()
    plain = native.linear(x, packed)
    fused = native.linear(x, packed, residual=res)
    assert plain is not None and fused is not None
    assert torch.equal(fused, plain + res)  # rounded output, then a bf16 add
    assert native.linear(x, packed, residual=res[:, :40]) is None  # wrong shape: refused


def test_decode_attention_appends_new_rows() -> None:
    hq, hkv, d, cap = 6, 2, 64, 40
    k_cache = torch.randn(4, hkv, cap, d).bfloat16()
    v_cache = torch.randn(4, hkv, cap, d).bfloat16()
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    slots, lengths = torch.tensor([2, 0]), torch.tensor([9, 40])
    qkv = torch.randn(2, hq + 2 * hkv, d).bfloat16()
    q, k_new, v_new = qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]
    for i, (slot, n) in enumerate(zip(slots.tolist(), lengths.tolist(), strict=True)):
        expected_k[slot, :, n - 1] = k_new[i]
        expected_v[slot, :, n - 1] = v_new[i]
    reference = native.decode_attention(q, expected_k, expected_v, slots, lengths, 0.125)
    out = native.decode_attention(q, k_cache, v_cache, slots, lengths, 0.125, k_new, v_new)
    assert out is not None and reference is not None
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    assert torch.equal(out, reference)
    too_long = torch.tensor([9, 41])  # beyond the capacity: refused, nothing written
    assert native.decode_attention(q, k_cache, v_cache, slots, too_long, 0.125, k_new,
                                   v_new) is None


def test_thread_pool_survives_fork() -> None:
    """A forked child (local multi-process runs) inherits the pool's counters but not its
    threads: it must start its own instead of waiting for the parent's."""
    import os
    import signal
    import time

    w = torch.randn(256, 64).bfloat16()
    packed = native.pack_linear(w)
    assert packed is not None
    x = torch.randn(4, 64).bfloat16()
    torch.set_num_threads(2)
    try:
        assert native.linear(x, packed) is not None  # the parent's pool is running
        pid = os.fork()
        if pid == 0:  # child: exit 0 only if the 2-way kernel call returns the right result
            y = native.linear(x, packed)
            ok = y is not None and bool(((y.float() - x.float() @ w.float().t()).abs()
                                         < 0.1).all())
            os._exit(0 if ok else 1)
        deadline = time.monotonic() + 60
        done, status = 0, 0
        while not done and time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)
        if not done:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung in the kernel's thread pool")
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        torch.set_num_threads(1)
