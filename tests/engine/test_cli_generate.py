"""`exegpt generate` on tiny models: plumbing (chat template, ids, JSON) and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.engine.generate import generate
from common.engine.sampling import SamplingParams
from common.models.config import ModelConfig
from common.models.gguf_writer import vocab_from_tokenizer, write_llama_gguf
from common.models.registry import load_model_spec
from common.models.weights import RandomWeights
from coordinator.cli import main

torch.set_num_threads(1)
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-llama's shape with random weights and a small trained byte-level BPE vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        ["What is the capital of France? Paris is.", "hello world " * 3] * 3,
        trainers.BpeTrainer(vocab_size=300, show_progress=False,
                            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    vocab = vocab_from_tokenizer(tok, pre="gpt-2", chat_template=TEMPLATE)
    cfg = ModelConfig.preset("tiny-llama").with_(vocab_size=len(vocab.tokens), max_position=64)
    source = RandomWeights(cfg, seed=3, std=0.1)
    state = {name: source.get(name) for name in source.names()}
    return write_llama_gguf(tmp_path_factory.mktemp("cli") / "tiny.gguf", cfg, state,
                            quant="Q8_0", vocab=vocab)


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(["generate", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_prompt_with_chat_template(capsys: pytest.CaptureFixture[str], tiny_gguf: Path) -> None:
    out = run_json(capsys, "--model", str(tiny_gguf), "--prompt", "What is the capital?",
                   "--max-new-tokens", "6", "--dtype", "float32")
    spec = load_model_spec(tiny_gguf)
    ids = spec.tokenizer.encode_chat([{"role": "user", "content": "What is the capital?"}])
    assert out["chat_template"] is True and out["prompt_ids"] == ids
    expected = generate(spec, [ids], SamplingParams(max_new_tokens=6), dtype="float32")[0]
    assert out["token_ids"] == expected.token_ids
    assert out["text"] == spec.tokenizer.decode(expected.token_ids)
    assert out["finish_reason"] == expected.finish_reason

    plain = run_json(capsys, "--model", str(tiny_gguf), "--prompt", "hello world", "--no-chat",
                     "--max-new-tokens", "3")
    assert plain["chat_template"] is False
    assert plain["prompt_ids"] == spec.tokenizer.encode("hello world")
    assert main(["generate", "--model", str(tiny_gguf), "--prompt", "hello",
                 "--max-new-tokens", "2"]) == 0
    captured = capsys.readouterr()
    assert not captured.out.startswith("{") and "new tokens" in captured.err


def test_prompt_ids_on_a_preset(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_json(capsys, "--model", "tiny-llama", "--prompt-ids", "5,6,7,8",
                   "--max-new-tokens", "5", "--dtype", "float32")
    expected = generate("tiny-llama", [[5, 6, 7, 8]], SamplingParams(max_new_tokens=5),
                        dtype="float32")[0]
    assert out["token_ids"] == expected.token_ids and out["text"] is None


def test_seeded_sampling_repeats(capsys: pytest.CaptureFixture[str], tiny_gguf: Path) -> None:
    args = ("--model", str(tiny_gguf), "--prompt", "hello", "--max-new-tokens", "8",
            "--temperature", "1.5", "--top-p", "0.95", "--top-k", "50", "--seed", "7",
            "--ignore-eos")
    first, second = run_json(capsys, *args), run_json(capsys, *args)
    assert first["token_ids"] == second["token_ids"] and len(first["token_ids"]) == 8


@pytest.mark.parametrize("argv, message", [
    (["--model", "no-such-model", "--prompt-ids", "1"], "neither a model directory"),
    (["--model", "/nonexistent/model.gguf", "--prompt-ids", "1"], "does not exist"),
    (["--model", "tiny-llama", "--prompt", "hi"], "has no tokenizer"),
    (["--model", "tiny-llama", "--prompt-ids", ",".join(["3"] * 300)], "context is 256"),
    (["--model", "tiny-llama", "--prompt-ids", "1,2", "--tp", "3"], "does not divide"),
    (["--model", "tiny-llama", "--prompt-ids", "1,2", "--stages", "5"], "--stages must be"),
    (["--model", "tiny-llama", "--prompt-ids", "1,x"], "comma-separated integers"),
    (["--model", "tiny-llama", "--prompt-ids", "1,999"], "outside the vocabulary"),
    (["--model", "tiny-llama", "--prompt-ids", "1", "--greedy", "--temperature", "0.7"],
     "contradict"),
    (["--model", "tiny-llama", "--prompt-ids", "1", "--top-p", "0.5"], "only apply when"),
    (["--model", "tiny-llama", "--prompt-ids", "1", "--max-new-tokens", "0"], ">= 1"),
])
def test_bad_input_exits_2_with_a_message(capsys: pytest.CaptureFixture[str], argv: list[str],
                                          message: str) -> None:
    assert main(["generate", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("exegpt generate: error:") and message in err, err


def test_tensor_parallel_matches_single_process(capsys: pytest.CaptureFixture[str]) -> None:
    args = ("--model", "tiny-llama", "--prompt-ids", "9,8,7,6,5", "--max-new-tokens", "6",
            "--dtype", "float32")
    single = run_json(capsys, *args)
    split = run_json(capsys, *args, "--tp", "2")
    assert split["token_ids"] == single["token_ids"]


@pytest.mark.slow
def test_default_model_answers_the_readme_question() -> None:
    """The README's first command, as a user runs it: the console script, default model."""
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("exegpt")
    proc = subprocess.run([str(exe), "generate", "--prompt", "What is the capital of France?"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_hf_directory_matches_transformers(capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path, tiny_gguf: Path) -> None:
    """An HF directory (safetensors + tokenizer.json + chat template): the CLI's tokens equal
    transformers' greedy generate on the same prompt ids."""
    transformers = pytest.importorskip("transformers")
    tokenizer = load_model_spec(tiny_gguf).tokenizer
    hf_cfg = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(4)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    model.save_pretrained(tmp_path)
    tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": TEMPLATE, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}))
    out = run_json(capsys, "--model", str(tmp_path), "--prompt", "What is the capital?",
                   "--max-new-tokens", "10", "--dtype", "float32")
    assert out["chat_template"] is True
    ids = torch.tensor([out["prompt_ids"]])
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=10, pad_token_id=2)
    assert out["token_ids"] == ref[0, ids.shape[1]:].tolist()
