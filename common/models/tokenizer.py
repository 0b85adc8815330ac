"""Text <-> token ids and the chat prompt, for HF directories and GGUF files alike.

One ``Tokenizer`` wraps a ``tokenizers.Tokenizer`` (the Rust fast tokenizer transformers uses
too) plus what the fast tokenizer does not know: the chat template, the end-of-sequence ids a
generation must stop on, and the special tokens the template refers to.

Two sources:
- an HF directory: ``tokenizer.json`` is the whole pipeline; ``tokenizer_config.json`` (or
  ``chat_template.jinja``) adds the chat template and special tokens, ``generation_config.json``
  / ``config.json`` add extra stop ids.
- a GGUF file: the vocabulary, merges and token types live in metadata, and the pre-tokenizer is
  only named (``tokenizer.ggml.pre``); ``common.models.gguf_vocab`` rebuilds the pipeline.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.models.chat_template import ChatTemplateError, Message, render_chat

if TYPE_CHECKING:
    import tokenizers
    from gguf import GGUFReader


class Tokenizer:
    """``encode``/``decode`` ids, stop ids, and the chat prompt for one model."""

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token: str | None = None,
                 eos_tokens: Sequence[str] = (), pad_token: str | None = None,
                 extra_eos_ids: Iterable[int] = (), chat_template: str | None = None) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_tokens[0] if eos_tokens else None
        self.pad_token = pad_token
        self.chat_template = chat_template
        self.bos_token_id = self._id_of(bos_token)
        self.pad_token_id = self._id_of(pad_token)
        ids = [self._id_of(token) for token in eos_tokens] + [int(i) for i in extra_eos_ids]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in ids if i is not None))

    def _id_of(self, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"special token {token!r} is not in the tokenizer's vocabulary")
        return int(token_id)

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` applies the BOS/EOS post-processing."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        bad = [i for i in ids if not 0 <= int(i) < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary "
                             f"(size {self.vocab_size})")
        return str(self.backend.decode([int(i) for i in ids],
                                       skip_special_tokens=skip_special_tokens))

    def apply_chat_template(self, messages: Sequence[Message], *,
                            add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt text the model was fine-tuned on for ``messages``."""
        if not self.chat_template:
            raise ChatTemplateError("this tokenizer has no chat template; pass plain text "
                                    "(e.g. `exegpt generate --no-chat`)")
        specials = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                    "pad_token": self.pad_token or ""}
        return render_chat(self.chat_template, messages,
                           add_generation_prompt=add_generation_prompt,
                           special_tokens=specials, **extra)

    def encode_chat(self, messages: Sequence[Message], *,
                    add_generation_prompt: bool = True) -> list[int]:
        """Ids of the rendered chat prompt; the template writes any BOS itself, so none is added."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False)


# ---- HF directories ---------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes a special token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template_from(directory: Path, config: dict[str, Any]) -> str | None:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {entry.get("name"): entry.get("template")
                 for entry in template if isinstance(entry, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [int(v) for v in value if isinstance(v, int)]
    return []


def load_hf_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer of an HF model directory (needs ``tokenizer.json``)."""
    import tokenizers

    directory = Path(directory)
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no tokenizer.json (the fast-tokenizer file); "
                                "pass --prompt-ids or add the tokenizer files to the directory")
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises plain Exception on malformed files
        raise ValueError(f"{path} is not a valid tokenizer.json: {exc}") from exc
    config = _read_json(directory / "tokenizer_config.json")
    extra_eos = _as_id_list(_read_json(directory / "generation_config.json").get("eos_token_id"))
    extra_eos += _as_id_list(_read_json(directory / "config.json").get("eos_token_id"))
    eos = _token_text(config.get("eos_token"))
    return Tokenizer(backend, bos_token=_token_text(config.get("bos_token")),
                     eos_tokens=[eos] if eos else [],
                     pad_token=_token_text(config.get("pad_token")),
                     extra_eos_ids=extra_eos, chat_template=_chat_template_from(directory, config))


# ---- GGUF files -------------------------------------------------------------------------------
def tokenizer_from_gguf(reader: GGUFReader) -> Tokenizer:
    """The tokenizer stored in a GGUF file's metadata (byte-level BPE vocabularies)."""
    from common.models.gguf_vocab import GGUFVocab, build_backend

    vocab = GGUFVocab.from_reader(reader)
    backend = build_backend(vocab)
    token = vocab.token_text
    return Tokenizer(backend, bos_token=token(vocab.bos_token_id),
                     eos_tokens=[t for t in [token(vocab.eos_token_id)] if t is not None],
                     extra_eos_ids=vocab.extra_eos_ids, pad_token=token(vocab.pad_token_id),
                     chat_template=vocab.chat_template)
