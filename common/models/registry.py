"""Model families and sources: maps a name or a path to (config, weights, tokenizer).

A family module (``common.models.<family>``) provides:
- ``config_from_hf(hf_config: dict) -> ModelConfig`` (raise ValueError for unsupported options),
- ``weight_shapes(cfg) -> dict[str, tuple[int, ...]]`` (HF names of every tensor; used for
  random init and for checking loaded shapes),
- ``build_stage(cfg, *, layer_range, encoder_layer_range, tp, device, dtype, weights)``
  -> an ``nn.Module`` with ``encode(batch)`` / ``decode(batch)`` (docs/engine.md).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

from common.models.config import FAMILIES, ModelConfig

FAMILY_MODULES = {family: f"common.models.{family}" for family in FAMILIES}

# HF ``model_type`` -> our family (Mistral-style configs are llama-shaped).
HF_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "opt": "opt", "gpt2": "gpt2",
                  "t5": "t5"}


class ModelSpec(NamedTuple):
    config: ModelConfig
    weights: Any  # WeightSource
    tokenizer: Any  # common.models.tokenizer.Tokenizer | None


def family_module(family: str) -> ModuleType:
    if family not in FAMILY_MODULES:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(FAMILY_MODULES)}")
    return importlib.import_module(FAMILY_MODULES[family])


def family_for_hf(hf_config: dict[str, Any]) -> str:
    model_type = hf_config.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        archs = hf_config.get("architectures")
        raise ValueError(
            f"unsupported architecture: model_type={model_type!r} (architectures={archs}); "
            f"supported model types: {sorted(HF_MODEL_TYPES)}"
        )
    return HF_MODEL_TYPES[model_type]


def config_from_hf(hf_config: dict[str, Any]) -> ModelConfig:
    return family_module(family_for_hf(hf_config)).config_from_hf(hf_config)


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not a Hugging Face model directory: "
                                "config.json is missing")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"corrupt {path}: {exc}") from exc


def check_shapes(cfg: ModelConfig, weights: Any, names: list[str] | None = None) -> None:
    """Fail early, naming the tensor, when the source disagrees with the config's shapes."""
    expected = family_module(cfg.family).weight_shapes(cfg)
    available = set(weights.names())
    for name in names if names is not None else sorted(expected):
        if name not in expected:
            continue
        if name not in available:
            raise ValueError(f"weight {name!r} is missing from the model files")
        got = tuple(weights.shape(name))
        if got != tuple(expected[name]):
            raise ValueError(f"weight {name!r} has shape {got}, but the config implies "
                             f"{tuple(expected[name])}")


def load_model_spec(path_or_preset: str | Path, seed: int = 0) -> ModelSpec:
    """An HF directory, a ``.gguf`` file, or a preset name (random weights, no tokenizer)."""
    from common.models.weights import RandomWeights, SafetensorsWeights

    text = str(path_or_preset)
    path = Path(text)
    if text.endswith(".gguf"):
        if not path.exists():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        from common.models.gguf_loader import load_gguf

        return ModelSpec(*load_gguf(path))
    if path.is_dir():
        cfg = config_from_hf(read_hf_config(path))
        weights = SafetensorsWeights(path)
        tokenizer = None
        if (path / "tokenizer.json").exists():
            from common.models.tokenizer import load_hf_tokenizer

            tokenizer = load_hf_tokenizer(path)
        return ModelSpec(cfg, weights, tokenizer)
    if text in ModelConfig.preset_names():
        cfg = ModelConfig.preset(text)
        return ModelSpec(cfg, RandomWeights(cfg, seed=seed), None)
    raise ValueError(f"{text!r} is neither a model directory, a .gguf file nor a preset "
                     f"(presets: {ModelConfig.preset_names()})")


def build_stage(cfg: ModelConfig, **kwargs: Any) -> Any:
    """Dispatch to the family's ``build_stage`` (see the module docstring for the arguments)."""
    return family_module(cfg.family).build_stage(cfg, **kwargs)
