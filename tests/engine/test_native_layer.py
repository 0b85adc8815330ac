"""The one-call decoder layer (common/engine/native_layer.py) against the module path.

It runs the same C kernels in the same order, so decode logits must be bit-identical to the
unfused path (which the token-exactness tests compare with transformers), over ragged batches,
with and without attention biases. Skipped without the C kernels.
"""

from __future__ import annotations

import pytest
import torch

from common.engine import native, native_layer
from common.engine.batch import StageBatch
from common.models import layers
from common.models.config import ModelConfig
from common.models.registry import build_stage

torch.set_num_threads(1)
pytestmark = pytest.mark.skipif(native.lib() is None,
                                reason="C kernels unavailable (gcc or avx512_bf16 missing)")


def _config(bias: bool) -> ModelConfig:
    return ModelConfig(family="llama", name="fused-llama", vocab_size=300, hidden_size=96,
                       num_layers=3, num_heads=6, num_kv_heads=2, head_dim=32, ffn_size=160,
                       max_position=512, activation="silu", tie_embeddings=True,
                       attention_bias=bias)


def _decode_logits(stage: torch.nn.Module, steps: int) -> list[torch.Tensor]:
    lengths = [3, 17, 40, 1, 29]
    ids = [f"r{i}" for i in range(len(lengths))]
    prompts = [[(7 * i + 3 * j) % 290 + 5 for j in range(n)] for i, n in enumerate(lengths)]
    out = [stage.encode(StageBatch.from_prompts(ids, prompts))]
    for _ in range(steps):
        out.append(stage.decode(StageBatch.from_tokens(ids, out[-1].argmax(-1).tolist())))
    for r in ids:
        stage.free(r)
    return out


@pytest.mark.parametrize(("bias", "threads"), [(False, 1), (True, 1), (False, 2)])
def test_fused_layer_is_bit_identical_to_module_path(bias: bool, threads: int,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Also with 2 threads: the fused call splits its kernels over the C pool, and each
    output element is still computed by one chunk in the same order."""
    stage = build_stage(_config(bias), dtype="bfloat16", seed=3)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _compare_paths(stage, monkeypatch)
    finally:
        torch.set_num_threads(before)


def _compare_paths(stage: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    ran = []
    run_layer = native_layer.StepPlan.run_layer

    def counted(self: native_layer.StepPlan, *args: object) -> torch.Tensor | None:
        out = run_layer(self, *args)  # type: ignore[arg-type]
        ran.append(out is not None)
        return out

    monkeypatch.setattr(native_layer.StepPlan, "run_layer", counted)
    fused = _decode_logits(stage, steps=4)
    assert ran and all(ran), "the fused layer did not run"
    monkeypatch.setattr(layers.DecoderLayer, "step_plan", lambda self, ctx: None)
    ran.clear()
    plain = _decode_logits(stage, steps=4)
    assert not ran
    for a, b in zip(fused, plain, strict=True):
        assert torch.equal(a, b)


def test_layers_that_do_not_fit_use_the_module_path() -> None:
    opt = build_stage(ModelConfig(family="opt", name="o", vocab_size=64, hidden_size=64,
                                  num_layers=1, num_heads=2, head_dim=32, ffn_size=64,
                                  max_position=64, activation="relu"), dtype="bfloat16")
    assert opt.layers[0].fused_weights() is None  # LayerNorm, no gate
    fp32 = build_stage(_config(False), dtype="float32")
    assert fp32.layers[0].fused_weights() is None
    unpacked = build_stage(_config(False), dtype="bfloat16", pack_weights=False)
    assert unpacked.layers[0].fused_weights() is None
    assert len(_decode_logits(unpacked, steps=2)) == 3
