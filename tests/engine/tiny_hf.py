"""Tiny random-weight transformers models saved as HF directories, plus greedy references.

Weights are drawn wider than transformers' default (std 0.02 gives near-uniform logits where
argmax ties would make token-exact comparisons meaningless); float32 throughout.
"""

from __future__ import annotations

from pathlib import Path

import torch

PROMPTS = [[5, 17, 33, 2 + 40, 61, 7, 9], [11, 3, 250], [8] * 3 + list(range(20, 32)), [99]]
MAX_NEW = [10, 4, 8, 6]


def hf_model(family: str, seed: int = 0, **overrides: object) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=256, max_position_embeddings=64)
    if family == "llama":
        options = dict(num_key_value_heads=2, tie_word_embeddings=False) | overrides
        cfg = tf.LlamaConfig(**common, hidden_size=64, num_hidden_layers=4,
                             num_attention_heads=4, intermediate_size=96,
                             initializer_range=0.2, bos_token_id=1, eos_token_id=2, **options)
        model = tf.LlamaForCausalLM(cfg)
    elif family == "opt":
        cfg = tf.OPTConfig(**common, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                           ffn_dim=96, init_std=0.2, **overrides)
        model = tf.OPTForCausalLM(cfg)
    elif family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=4, n_head=4,
                            n_inner=96, initializer_range=0.2, bos_token_id=0, eos_token_id=0,
                            **overrides)
        model = tf.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(family)
    return model.eval()


def save(model: torch.nn.Module, directory: Path) -> Path:
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


@torch.inference_mode()
def greedy_reference(model: torch.nn.Module, prompts: list[list[int]],
                     max_new: list[int]) -> list[list[int]]:
    """transformers' greedy generate, one prompt at a time (no padding involved)."""
    out = []
    for prompt, n in zip(prompts, max_new, strict=True):
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             min_new_tokens=0, attention_mask=torch.ones(1, len(prompt),
                                                                         dtype=torch.long))
        out.append(ids[0, len(prompt):].tolist())
    return out
