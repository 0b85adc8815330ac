"""`exegpt bench engine` harness on a tiny preset: structure and arithmetic, no speed claims."""

from __future__ import annotations

import json

import pytest
import torch

from common.models.config import ModelConfig
from common.models.registry import load_model_spec
from coordinator.cli import main
from coordinator.commands import _engine_bench as eb

torch.set_num_threads(1)


def test_bench_json_report(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "engine", "--model", "tiny-llama", "--batches", "1,3", "--prompt-len", "8",
            "--steps", "2", "--repeats", "2", "--warmup-steps", "1", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    cfg = ModelConfig.preset("tiny-llama")
    assert [r["batch"] for r in result["rows"]] == [1, 3]
    assert result["hardware"]["threads"] == 1 and result["hardware"]["torch"] == torch.__version__
    machine = result["machine"]
    assert machine["copy_bandwidth_Bps"] > 0 and machine["matmul_peak_flops"] > 0
    weight_bytes = 2 * (cfg.total_params() - cfg.vocab_size * cfg.hidden_size)  # untied
    for row in result["rows"]:
        assert row["weight_bytes_per_step"] == weight_bytes
        assert row["kv_bytes_per_step"] == int(row["batch"] * 9.5 * cfg.num_layers
                                               * cfg.kv_bytes_per_token_per_layer(2))
        assert len(row["exegpt_step_ms_repeats"]) == len(row["transformers_step_ms_repeats"]) == 2
        assert row["exegpt_tok_s"] == pytest.approx(row["batch"] * 1000 / row["exegpt_ms_per_step"])
        assert row["ratio"] == pytest.approx(row["exegpt_tok_s"] / row["transformers_tok_s"])
        assert row["bw_kv_floor_ms"] > row["bw_floor_ms"] > 0 and row["compute_floor_ms"] > 0
    assert "batch32_tok_s" not in result["targets"]
    assert result["targets"]["min_ratio"] == pytest.approx(min(r["ratio"] for r in result["rows"]))


def test_both_systems_decode_the_same_tokens() -> None:
    """The reference really runs the same weights: float32 greedy tokens agree step for step."""
    spec = load_model_spec("tiny-llama")
    prompts = eb.make_prompts(spec.config, 3, 10, seed=5)
    ours, ref = eb.EngineDecoder(spec, "float32"), eb.TransformersDecoder(spec, "float32")
    ours.run(prompts, 6)
    ref.run(prompts, 6)
    assert ours.generated == ref.generated
    assert len(ours.generated) == 3 and all(len(seq) == 7 for seq in ours.generated)


def test_table_output_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "engine", "--model", "tiny-llama", "--batches", "2", "--prompt-len", "4",
            "--steps", "1", "--repeats", "1", "--warmup-steps", "1", "--no-reference"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "ours ms/step" in out and "hardware:" in out and "copy bandwidth" in out
    assert main(["bench", "engine", "--model", "tiny-llama", "--batches", "x"]) == 2
    assert "comma-separated" in capsys.readouterr().err
    assert main(["bench", "engine", "--model", "tiny-llama", "--prompt-len", "300"]) == 2
    assert "context" in capsys.readouterr().err
