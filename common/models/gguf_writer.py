"""Write a llama-family model (HF names) to a GGUF file the way llama.cpp's converter does.

Used to make small GGUF files on the fly (tests, and exporting a tiny model for llama.cpp):
HF names are mapped to GGUF names, q_proj/k_proj rows are permuted into llama.cpp's RoPE
layout (the inverse of what ``gguf_loader`` undoes), 2-D weights are quantized to the chosen
type (norms stay F32, as llama.cpp keeps them), and an optional byte-level BPE vocabulary is
stored as ``tokenizer.ggml.*`` metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from common.models.config import ModelConfig

if TYPE_CHECKING:
    import torch

_LAYER_PARTS = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight",
           "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


@dataclass(frozen=True)
class GGUFVocabSpec:
    """A byte-level BPE vocabulary to embed: tokens by id, merges, control-token ids."""

    tokens: list[str]
    merges: list[str]
    control_ids: list[int] = field(default_factory=list)
    pre: str = "smollm"
    chat_template: str | None = None


def gguf_name(hf: str) -> str:
    if hf in _GLOBAL:
        return _GLOBAL[hf]
    prefix, _, rest = hf.partition("model.layers.")
    layer, _, tail = rest.partition(".")
    part, _, kind = tail.rpartition(".")
    if prefix or part not in _LAYER_PARTS:
        raise ValueError(f"{hf!r} is not a llama tensor name")
    return f"blk.{layer}.{_LAYER_PARTS[part]}.{kind}"


def permute_for_llama_cpp(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: within each head, interleave the two RoPE halves."""
    head_dim = weights.shape[0] // num_heads
    grouped = weights.reshape(num_heads, 2, head_dim // 2, *weights.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weights.shape)


def _add_metadata(w: Any, cfg: ModelConfig) -> None:
    w.add_name(cfg.name or "exegpt-export")
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.ffn_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)


def _add_vocab(w: Any, cfg: ModelConfig, vocab: GGUFVocabSpec) -> None:
    types = [3 if i in set(vocab.control_ids) else 1 for i in range(len(vocab.tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(types)
    w.add_token_merges(vocab.merges)
    if cfg.bos_token_id is not None:
        w.add_bos_token_id(cfg.bos_token_id)
    if cfg.eos_token_ids:
        w.add_eos_token_id(cfg.eos_token_ids[0])
    if cfg.pad_token_id is not None:
        w.add_pad_token_id(cfg.pad_token_id)
    w.add_add_bos_token(False)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)


def _encode_tensor(name: str, array: np.ndarray, quant: str) -> tuple[np.ndarray, object]:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    qtype = GGMLQuantizationType[quant]
    if array.ndim == 1 or name.endswith("norm.weight"):
        return array.astype(np.float32), GGMLQuantizationType.F32
    return quantize(array.astype(np.float32), qtype), qtype


def write_llama_gguf(path: str | Path, cfg: ModelConfig, state_dict: dict[str, torch.Tensor], *,
                     quant: str = "F32", vocab: GGUFVocabSpec | None = None) -> Path:
    """Write ``state_dict`` (HF llama names) to ``path`` with 2-D weights stored as ``quant``."""
    import gguf

    if cfg.family != "llama":
        raise ValueError(f"GGUF export supports the llama family, not {cfg.family!r}")
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), "llama")
    _add_metadata(writer, cfg)
    if vocab is not None:
        _add_vocab(writer, cfg, vocab)
    for hf, tensor in state_dict.items():
        if hf == "lm_head.weight" and cfg.tie_embeddings:
            continue
        array = tensor.detach().float().cpu().numpy()
        if ".q_proj." in hf:
            array = permute_for_llama_cpp(array, cfg.num_heads)
        elif ".k_proj." in hf:
            array = permute_for_llama_cpp(array, cfg.kv_heads)
        data, qtype = _encode_tensor(hf, array, quant)
        writer.add_tensor(gguf_name(hf), data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def vocab_from_tokenizer(backend: Any, *, pre: str = "smollm",
                         chat_template: str | None = None) -> GGUFVocabSpec:
    """The GGUF vocabulary of a byte-level BPE ``tokenizers.Tokenizer`` (dense ids 0..n-1)."""
    import json

    data = json.loads(backend.to_str())
    model = data["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"only BPE tokenizers can be exported to GGUF, not {model.get('type')!r}")
    by_id = {int(i): t for t, i in model["vocab"].items()}
    by_id |= {int(a["id"]): a["content"] for a in data.get("added_tokens", [])}
    if sorted(by_id) != list(range(len(by_id))):
        raise ValueError("token ids must be dense (0..n-1) to be stored in a GGUF vocabulary")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    control = [int(a["id"]) for a in data.get("added_tokens", []) if a.get("special")]
    return GGUFVocabSpec(tokens=[by_id[i] for i in range(len(by_id))], merges=merges,
                         control_ids=control, pre=pre, chat_template=chat_template)
