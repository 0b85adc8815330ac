"""Decode speed probe (not a test): our stage vs transformers eager, interleaved step by step.

    .venv/bin/python tests/engine/perf_decode.py [batches=1,8,32] [threads=1] [steps=12]

smollm2-135m shapes, random weights, bf16, 128-token prompts. Each step of ours is followed by
one of transformers, so both see the same machine load; medians are printed with the ratio.
Besides wall time it prints process CPU time per step ("cpu"): on a shared, overloaded machine
the wall time includes the time the scheduler ran other processes, CPU time does not (with one
thread it is the step's compute time; with more it sums the threads). The official benchmark
is ``exegpt bench engine``.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch


def main() -> None:
    import transformers as tf

    from common.engine.batch import StageBatch
    from common.models.registry import build_stage, load_model_spec

    batches = [int(b) for b in (sys.argv[1] if len(sys.argv) > 1 else "1,8,32").split(",")]
    torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 12
    spec = load_model_spec("smollm2-135m")
    cfg = spec.config
    stage = build_stage(cfg, weights=spec.weights, dtype="bfloat16")
    hf_cfg = tf.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
        intermediate_size=cfg.ffn_size, max_position_embeddings=cfg.max_position,
        tie_word_embeddings=True, rope_theta=cfg.rope_theta)
    hf = tf.LlamaForCausalLM(hf_cfg).to(torch.bfloat16).eval()
    for b in batches:
        prompts = torch.randint(0, cfg.vocab_size, (b, 128), generator=torch.Generator()
                                .manual_seed(0))
        ids = [f"r{i}" for i in range(b)]
        for r in list(stage.cache.order()):
            stage.free(r)
        toks = stage.encode(StageBatch.from_prompts(ids, prompts.tolist())).argmax(-1).tolist()
        ours, theirs, ours_cpu, theirs_cpu = [], [], [], []
        with torch.inference_mode():
            out = hf(prompts, use_cache=True)
            cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(steps):
                t, c = time.perf_counter(), time.process_time()
                toks = stage.decode(StageBatch.from_tokens(ids, toks)).argmax(-1).tolist()
                ours.append(time.perf_counter() - t)
                ours_cpu.append(time.process_time() - c)
                t, c = time.perf_counter(), time.process_time()
                out = hf(tok, past_key_values=cache, use_cache=True)
                cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                theirs.append(time.perf_counter() - t)
                theirs_cpu.append(time.process_time() - c)
        o, h = statistics.median(ours[1:]), statistics.median(theirs[1:])
        oc, hc = statistics.median(ours_cpu[1:]), statistics.median(theirs_cpu[1:])
        print(f"batch {b:3d}: ours {o * 1e3:7.1f} ms/step {b / o:7.1f} tok/s | transformers "
              f"{h * 1e3:7.1f} ms/step {b / h:7.1f} tok/s | speedup {h / o:4.2f}x | cpu ms/step "
              f"ours {oc * 1e3:6.1f} transformers {hc * 1e3:6.1f} speedup {hc / oc:4.2f}x",
              flush=True)


if __name__ == "__main__":
    main()
