"""Rebuild a fast tokenizer from the vocabulary a GGUF file stores in its metadata.

A GGUF ``gpt2``-model vocabulary is a byte-level BPE: tokens spelled in GPT-2's byte alphabet
("Ġthe"), merges "a b" in priority order, and a token type per id (1 normal, 3 control,
4 user-defined, 6 byte). What the file does not store is the pre-tokenizer, only its name in
``tokenizer.ggml.pre``; the regexes below are the ones llama.cpp uses for those names (and the
ones in the models' own tokenizer.json files). SmolLM ("smollm") splits every digit on its own
before the GPT-2 regex, so "2024" is four tokens.

Control tokens become special added tokens (matched whole, dropped by ``decode`` with
``skip_special_tokens``), user-defined ones plain added tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from common.models.gguf_meta import field

if TYPE_CHECKING:
    import tokenizers
    from gguf import GGUFReader

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4  # llama.cpp token types

_GPT2_STYLE = ("default", "gpt-2", "gpt2", "mpt", "olmo", "jais")
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_IGNORE_MERGES = ("llama3", "llama-bpe", "llama-v3", "falcon3", "smaug-bpe", "dbrx")
_SPLIT_REGEX = {
    **dict.fromkeys(_IGNORE_MERGES, _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"), _QWEN2_SPLIT),
}
SUPPORTED_PRE_TOKENIZERS = tuple(sorted((*_GPT2_STYLE, *_DIGITS_THEN_GPT2, *_SPLIT_REGEX)))


@dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer part of a GGUF file's metadata, as plain values."""

    model: str
    pre: str
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    merges: tuple[str, ...]
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    extra_eos_ids: tuple[int, ...]
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | None

    def __post_init__(self) -> None:
        if self.model != "gpt2":
            raise ValueError(
                f"GGUF tokenizer model {self.model!r} is not supported (only 'gpt2' byte-level "
                "BPE, as in SmolLM, Llama 3, Qwen2); use the model's HF directory with "
                "tokenizer.json, or pass --prompt-ids"
            )
        if self.pre not in SUPPORTED_PRE_TOKENIZERS:
            raise ValueError(f"GGUF pre-tokenizer {self.pre!r} is not supported; known: "
                             f"{', '.join(SUPPORTED_PRE_TOKENIZERS)}")
        if not self.tokens or len(self.token_types) not in (0, len(self.tokens)):
            raise ValueError("GGUF vocabulary is empty or its token types do not match its tokens")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < len(self.tokens):
                raise ValueError(f"GGUF {name}={value} is outside the vocabulary "
                                 f"of {len(self.tokens)}")

    @classmethod
    def from_reader(cls, reader: GGUFReader) -> GGUFVocab:
        def opt_id(key: str) -> int | None:
            value = field(reader, f"tokenizer.ggml.{key}", None)
            return None if value is None else int(value)

        extra = [opt_id(key) for key in ("eot_token_id", "eom_token_id")]
        return cls(
            model=str(field(reader, "tokenizer.ggml.model")),
            pre=str(field(reader, "tokenizer.ggml.pre", "default")),
            tokens=tuple(field(reader, "tokenizer.ggml.tokens")),
            token_types=tuple(int(t) for t in field(reader, "tokenizer.ggml.token_type", [])),
            merges=tuple(field(reader, "tokenizer.ggml.merges", [])),
            bos_token_id=opt_id("bos_token_id"), eos_token_id=opt_id("eos_token_id"),
            pad_token_id=opt_id("padding_token_id"),
            extra_eos_ids=tuple(i for i in extra if i is not None),
            add_bos=bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
            add_eos=bool(field(reader, "tokenizer.ggml.add_eos_token", False)),
            add_space_prefix=bool(field(reader, "tokenizer.ggml.add_space_prefix", False)),
            chat_template=field(reader, "tokenizer.chat_template", None),
        )

    def token_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokens[token_id]

    def token_type(self, token_id: int) -> int:
        return self.token_types[token_id] if self.token_types else TOKEN_NORMAL


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _spelled(token: str, alphabet: set[str]) -> str:
    """A normal token written with raw characters is re-spelled in the byte alphabet."""
    if set(token) <= alphabet:
        return token
    spelling = _byte_alphabet()
    return "".join(spelling[b] for b in token.encode("utf-8"))


def _vocab_dict(vocab: GGUFVocab) -> dict[str, int]:
    alphabet = set(_byte_alphabet().values())
    out: dict[str, int] = {}
    for index, token in enumerate(vocab.tokens):
        kind = vocab.token_type(index)
        text = token if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED) else _spelled(token, alphabet)
        out.setdefault(text, index)  # duplicates (padding filler) keep their first id
    return out


def _pre_tokenizer(pre: str, prefix_space: bool) -> tokenizers.pre_tokenizers.PreTokenizer:
    from tokenizers import Regex, pre_tokenizers

    if pre in _GPT2_STYLE:
        return pre_tokenizers.ByteLevel(add_prefix_space=prefix_space, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=prefix_space, use_regex=True),
        ])
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_REGEX[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=prefix_space, use_regex=False),
    ])


def _post_processor(vocab: GGUFVocab) -> tokenizers.processors.PostProcessor | None:
    from tokenizers import processors

    bos = vocab.token_text(vocab.bos_token_id) if vocab.add_bos else None
    eos = vocab.token_text(vocab.eos_token_id) if vocab.add_eos else None
    if bos is None and eos is None:
        return None
    prefix = [bos] if bos else []
    suffix = [eos] if eos else []
    single = " ".join([*prefix, "$A", *suffix])
    pair = " ".join([single, *prefix, "$B:1", *suffix])
    specials = [(t, vocab.tokens.index(t)) for t in dict.fromkeys([*prefix, *suffix])]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def build_backend(vocab: GGUFVocab) -> tokenizers.Tokenizer:
    """A ``tokenizers.Tokenizer`` equivalent to llama.cpp's for this vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    merges = [tuple(m.split(" ", 1)) for m in vocab.merges]
    if any(len(m) != 2 for m in merges):
        raise ValueError("GGUF merges must be 'left right' pairs")
    bpe = models.BPE(vocab=_vocab_dict(vocab), merges=merges, fuse_unk=False,
                     ignore_merges=vocab.pre in _IGNORE_MERGES)
    backend = Tokenizer(bpe)
    backend.pre_tokenizer = _pre_tokenizer(vocab.pre, vocab.add_space_prefix)
    backend.decoder = decoders.ByteLevel()
    kinds = [(t, vocab.token_type(i)) for i, t in enumerate(vocab.tokens)]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, k in kinds if k == TOKEN_CONTROL])
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, k in kinds if k == TOKEN_USER_DEFINED])
    post = _post_processor(vocab)
    if post is not None:
        backend.post_processor = post
    return backend
