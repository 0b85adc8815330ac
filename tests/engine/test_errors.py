"""Bad input fails early with a message naming the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from common.engine.generate import generate
from common.engine.sampling import SamplingParams
from common.engine.tp import TPGroup
from common.models.config import ModelConfig
from common.models.registry import build_stage, load_model_spec
from common.models.weights import RandomWeights, WeightError


@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    """A tiny llama directory written by hand (config.json + model.safetensors)."""
    cfg = ModelConfig.preset("tiny-llama")
    weights = RandomWeights(cfg)
    save_file({n: weights.get(n).contiguous() for n in weights.names()},
              str(tmp_path / "model.safetensors"))
    hf = {"model_type": "llama", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
          "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
          "num_key_value_heads": cfg.kv_heads, "intermediate_size": cfg.ffn_size,
          "max_position_embeddings": cfg.max_position, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    return tmp_path


def test_the_handwritten_checkpoint_loads_like_the_preset(checkpoint: Path) -> None:
    prompt = [[4, 5, 6]]
    a = generate(str(checkpoint), prompt, dtype="float32")[0].token_ids
    b = generate("tiny-llama", prompt, dtype="float32")[0].token_ids
    assert a == b


def test_missing_directory_or_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither a model directory"):
        load_model_spec(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model_spec(tmp_path)


def test_missing_weights_file(checkpoint: Path) -> None:
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(WeightError, match="no model.safetensors"):
        load_model_spec(checkpoint)


def test_corrupt_weights_file(checkpoint: Path) -> None:
    (checkpoint / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage")
    with pytest.raises(WeightError, match="cannot read"):
        load_model_spec(checkpoint)


def test_missing_shard_listed_in_index(checkpoint: Path) -> None:
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightError, match="missing shard"):
        load_model_spec(checkpoint)


def test_unknown_architecture(checkpoint: Path) -> None:
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "bert",
                                                        "architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match="unsupported architecture.*bert"):
        load_model_spec(checkpoint)


def test_shapes_not_matching_the_config(checkpoint: Path) -> None:
    hf = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps(hf | {"intermediate_size": 160}))
    spec = load_model_spec(checkpoint)
    with pytest.raises(ValueError, match=r"mlp\.gate_proj\.weight.*shape"):
        build_stage(spec.config, weights=spec.weights)


def test_missing_tensor(checkpoint: Path) -> None:
    tensors = load_file(str(checkpoint / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(checkpoint / "model.safetensors"))
    spec = load_model_spec(checkpoint)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*missing"):
        build_stage(spec.config, weights=spec.weights)


def test_tp_size_not_dividing_heads() -> None:
    cfg = ModelConfig.preset("tiny-llama")  # 4 heads
    with pytest.raises(ValueError, match="tp_size=3 does not divide num_heads=4"):
        build_stage(cfg, tp=TPGroup(tp_size=3, tp_rank=0, group=object()))


def test_prompt_longer_than_context() -> None:
    cfg = ModelConfig.preset("tiny-gpt2")
    with pytest.raises(ValueError, match="longer than the model's context"):
        generate("tiny-gpt2", [[1] * (cfg.max_position + 1)])


def test_generation_stops_at_the_context_end() -> None:
    cfg = ModelConfig.preset("tiny-gpt2")
    res = generate("tiny-gpt2", [[1] * (cfg.max_position - 2)],
                   SamplingParams(max_new_tokens=50, ignore_eos=True), dtype="float32")[0]
    # positions 0..253 are the prompt; tokens 1-2 are fed back at 254 and 255, token 3 is last
    assert len(res.token_ids) == 3 and res.finish_reason == "length"


def test_float16_on_cpu_and_unknown_dtype() -> None:
    cfg = ModelConfig.preset("tiny-opt")
    with pytest.raises(ValueError, match="bfloat16"):
        build_stage(cfg, dtype="float16")
    with pytest.raises(ValueError, match="unsupported dtype"):
        build_stage(cfg, dtype="int8")


def test_unknown_preset_and_bad_config() -> None:
    with pytest.raises(ValueError, match="presets"):
        load_model_spec("gpt-5")
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig.preset("tiny-llama").with_(num_kv_heads=3)
