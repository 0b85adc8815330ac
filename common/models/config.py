"""Model shapes as one frozen value, shared by the engine (torch) and the planner (torch-free).

The planner sizes memory and compute from this value alone, so it must import without torch and
carry every number a cost model needs: parameter bytes per layer, KV bytes per token, FLOPs.
Decoder-only models have ``num_encoder_layers == 0``; ``num_layers`` always counts decoder layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

FAMILIES = ("llama", "opt", "gpt2", "t5")
ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu")
LAYER_KINDS = ("encoder", "decoder")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and conventions of one model; see docs/interfaces.md for the field list."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    ffn_size: int
    max_position: int
    num_kv_heads: int | None = None  # None -> num_heads (multi-head attention)
    num_encoder_layers: int = 0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    activation: str = "gelu"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    gated_ffn: bool = False
    attention_bias: bool = False  # llama family only; OPT/GPT-2 always have biases
    name: str = ""

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        self._validate()

    def _validate(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; expected one of {FAMILIES}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; expected one of {ACTIVATIONS}"
            )
        for field_name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim",
                           "ffn_size", "max_position", "num_kv_heads"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{field_name} must be a positive int, got {value!r}")
        if self.num_encoder_layers < 0:
            raise ValueError("ModelConfig.num_encoder_layers must be >= 0")
        if self.family == "t5" and self.num_encoder_layers == 0:
            raise ValueError("a t5 model needs num_encoder_layers > 0")
        if self.family != "t5" and self.num_encoder_layers != 0:
            raise ValueError(
                f"family {self.family!r} is decoder-only: num_encoder_layers must be 0"
            )
        assert self.num_kv_heads is not None
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.norm_eps <= 0:
            raise ValueError("ModelConfig.norm_eps must be > 0")

    # ---- derived shapes -------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        """num_kv_heads as a plain int (it is never None after __post_init__)."""
        assert self.num_kv_heads is not None
        return self.num_kv_heads

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def is_encoder_decoder(self) -> bool:
        return self.num_encoder_layers > 0

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @property
    def has_biases(self) -> bool:
        """OPT and GPT-2 put a bias on every linear; llama (unless attention_bias) and T5 none."""
        return self.family in ("opt", "gpt2")

    # ---- planner helpers (counts are for the whole model, i.e. tp_size 1) ------------------
    def _attn_weights(self) -> int:
        return 2 * self.hidden_size * self.q_size + 2 * self.hidden_size * self.kv_size

    def _attn_params(self) -> int:
        biased = self.has_biases or self.attention_bias
        biases = (self.q_size + 2 * self.kv_size + self.hidden_size) if biased else 0
        return self._attn_weights() + biases

    def _ffn_weights(self) -> int:
        num_in = 2 if self.gated_ffn or self.family == "llama" else 1
        return (num_in + 1) * self.hidden_size * self.ffn_size

    def _ffn_params(self) -> int:
        biases = (self.ffn_size + self.hidden_size) if self.has_biases else 0
        return self._ffn_weights() + biases

    def _norm_params(self) -> int:
        """One norm: LayerNorm (weight+bias) for OPT/GPT-2, RMSNorm (weight) otherwise."""
        return self.hidden_size * (2 if self.has_biases else 1)

    def params_per_layer(self, kind: str = "decoder") -> int:
        """Parameter count of one layer; T5 decoder layers add cross-attention and a third norm."""
        if kind not in LAYER_KINDS:
            raise ValueError(f"layer kind must be one of {LAYER_KINDS}, got {kind!r}")
        if kind == "encoder" and not self.is_encoder_decoder:
            raise ValueError(f"{self.family} has no encoder layers")
        count = self._attn_params() + self._ffn_params() + 2 * self._norm_params()
        if kind == "decoder" and self.is_encoder_decoder:
            count += self._attn_params() + self._norm_params()
        return count

    def param_bytes_per_layer(self, kind: str = "decoder", dtype_bytes: int = 2) -> int:
        return self.params_per_layer(kind) * dtype_bytes

    def embedding_params(self) -> int:
        """Token embedding plus learned positions (OPT keeps 2 extra position rows)."""
        count = self.vocab_size * self.hidden_size
        if self.family == "opt":
            count += (self.max_position + 2) * self.hidden_size
        elif self.family == "gpt2":
            count += self.max_position * self.hidden_size
        return count

    def lm_head_params(self) -> int:
        """LM head weights (0 extra when tied to the embedding) plus the final norm."""
        head = 0 if self.tie_embeddings else self.vocab_size * self.hidden_size
        return head + self._norm_params()

    def total_params(self) -> int:
        layers = self.num_layers * self.params_per_layer("decoder")
        if self.is_encoder_decoder:
            layers += self.num_encoder_layers * self.params_per_layer("encoder")
            layers += self._norm_params()  # the encoder's final norm
            # one relative-position bias table per stack (encoder and decoder)
            layers += 2 * self.relative_attention_num_buckets * self.num_heads
        return layers + self.embedding_params() + self.lm_head_params()

    def kv_bytes_per_token_per_layer(self, dtype_bytes: int = 2) -> int:
        """Self-attention K and V for one token in one decoder layer (T5 cross-attention K/V
        costs the same per encoder token)."""
        return 2 * self.kv_size * dtype_bytes

    def flops_per_token_per_layer(self, kind: str = "decoder", context_len: int = 0) -> int:
        """Forward FLOPs for one token through one layer attending to ``context_len`` tokens:
        2 per weight (matmuls) plus QK^T and AV (4 * context * q_size)."""
        self.params_per_layer(kind)  # validates kind
        cross = kind == "decoder" and self.is_encoder_decoder
        matmul = 2 * (self._attn_weights() * (2 if cross else 1) + self._ffn_weights())
        attn = 4 * context_len * self.q_size
        if cross:
            attn *= 2  # cross-attention over a context of similar length (caller may refine)
        return matmul + attn

    def lm_head_flops_per_token(self) -> int:
        return 2 * self.vocab_size * self.hidden_size

    # ---- serialisation and presets ---------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if isinstance(out["eos_token_id"], tuple):
            out["eos_token_id"] = list(out["eos_token_id"])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}")
        return cls(**data)

    def with_(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)

    @staticmethod
    def preset(name: str) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
        return PRESETS[name]

    @staticmethod
    def preset_names() -> list[str]:
        return sorted(PRESETS)


def stage_layer_ranges(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """Split layers as evenly as possible, earlier stages taking the remainder."""
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"num_stages={num_stages} must be between 1 and num_layers={num_layers}")
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for s in range(num_stages):
        end = start + base + (1 if s < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


def _gpt3(name: str, layers: int, hidden: int, heads: int) -> ModelConfig:
    """GPT-3 shapes from the paper's table: GPT-2 architecture, 4x FFN, 2048 context."""
    return ModelConfig(
        family="gpt2", name=name, vocab_size=50257, hidden_size=hidden, num_layers=layers,
        num_heads=heads, head_dim=hidden // heads, ffn_size=4 * hidden, max_position=2048,
        activation="gelu_new", bos_token_id=50256, eos_token_id=50256,
    )


PRESETS: dict[str, ModelConfig] = {
    "t5-11b": ModelConfig(
        family="t5", name="t5-11b", vocab_size=32128, hidden_size=1024, num_layers=24,
        num_encoder_layers=24, num_heads=128, head_dim=128, ffn_size=65536, max_position=512,
        norm_eps=1e-6, activation="relu", tie_embeddings=True, eos_token_id=1, pad_token_id=0,
    ),
    "opt-13b": ModelConfig(
        family="opt", name="opt-13b", vocab_size=50272, hidden_size=5120, num_layers=40,
        num_heads=40, head_dim=128, ffn_size=20480, max_position=2048, activation="relu",
        bos_token_id=2, eos_token_id=2, pad_token_id=1,
    ),
    "gpt3-39b": _gpt3("gpt3-39b", 48, 8192, 64),
    "gpt3-101b": _gpt3("gpt3-101b", 80, 10240, 80),
    "gpt3-175b": _gpt3("gpt3-175b", 96, 12288, 96),
    "gpt3-341b": _gpt3("gpt3-341b", 120, 15360, 120),
    "smollm2-135m": ModelConfig(
        family="llama", name="smollm2-135m", vocab_size=49152, hidden_size=576, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, ffn_size=1536, max_position=8192,
        norm_eps=1e-5, rope_theta=100000.0, activation="silu", bos_token_id=1, eos_token_id=2,
        pad_token_id=2,
    ),
    "tiny-llama": ModelConfig(
        family="llama", name="tiny-llama", vocab_size=256, hidden_size=64, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, ffn_size=128, max_position=256,
        activation="silu", tie_embeddings=False, bos_token_id=1, eos_token_id=2,
    ),
    "tiny-opt": ModelConfig(
        family="opt", name="tiny-opt", vocab_size=256, hidden_size=64, num_layers=2,
        num_heads=4, head_dim=16, ffn_size=128, max_position=256, activation="relu",
        bos_token_id=2, eos_token_id=2, pad_token_id=1,
    ),
    "tiny-gpt2": ModelConfig(
        family="gpt2", name="tiny-gpt2", vocab_size=256, hidden_size=64, num_layers=2,
        num_heads=4, head_dim=16, ffn_size=256, max_position=256, activation="gelu_new",
        bos_token_id=0, eos_token_id=0,
    ),
    "tiny-t5": ModelConfig(
        family="t5", name="tiny-t5", vocab_size=256, hidden_size=64, num_layers=2,
        num_encoder_layers=2, num_heads=4, head_dim=16, ffn_size=128, max_position=256,
        norm_eps=1e-6, activation="relu", relative_attention_num_buckets=8,
        relative_attention_max_distance=32, eos_token_id=1, pad_token_id=0,
    ),
}
