"""Tiny random HF models saved with save_pretrained, and transformers' greedy outputs for them.

The reference is each prompt generated alone (no padding), cut after the first EOS, so a
mesh's batched, merged and compacted decoding must reproduce it token for token.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

torch.set_num_threads(1)


def make_llama(directory: Path, num_layers: int = 2, seed: int = 7) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=num_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      eos_token_id=3, bos_token_id=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger weights: a peaked, non-degenerate greedy output
        for p in model.parameters():
            p.mul_(4.0)
    model.save_pretrained(directory)
    save_word_tokenizer(directory, cfg.vocab_size)
    return directory


def save_word_tokenizer(directory: Path, vocab_size: int) -> None:
    """tokenizer.json of a word-level vocabulary "w0" .. "wN" (text prompts through the mesh)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(directory / "tokenizer.json"))


def make_t5(directory: Path) -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(3)
    cfg = T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2,
                   dropout_rate=0.0, relative_attention_num_buckets=8,
                   relative_attention_max_distance=20, decoder_start_token_id=0,
                   initializer_factor=3.0, feed_forward_proj="relu")
    T5ForConditionalGeneration(cfg).save_pretrained(directory)
    return directory


def workload(vocab: int, n: int, seed: int) -> list[tuple[list[int], int]]:
    """Mixed prompt lengths and output limits (prompt ids avoid the special ids 0..3)."""
    rng = random.Random(seed)
    return [([rng.randrange(4, vocab) for _ in range(rng.randint(1, 24))], rng.randint(1, 20))
            for _ in range(n)]


@torch.no_grad()
def hf_greedy(directory: Path, work: list[tuple[list[int], int]]) -> list[list[int]]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    seq2seq = AutoConfig.from_pretrained(directory).is_encoder_decoder
    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model = cls.from_pretrained(directory, dtype=torch.float32).eval()
    eos = model.config.eos_token_id
    out = []
    for prompt, n in work:
        ids = torch.tensor([prompt])
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=n, do_sample=False, pad_token_id=0)
        row = gen[0, 1:].tolist() if seq2seq else gen[0, len(prompt):].tolist()
        out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out
