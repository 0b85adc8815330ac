"""`exegpt bench engine`: decode speed of the engine vs transformers on the same weights, dtype,
batch and machine, in one run, next to the memory-bandwidth and compute floors of this machine.

Numbers from a shared machine move 10-20% between runs; the ratio (both systems measured in
the same run, alternating repeat by repeat) is the figure to compare across runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

# Reference figure, not measured in this run: llama-cpp-python 0.3.36, the Q4_1 SmolLM2 GGUF as
# shipped, single stream, decode after a 128-token prompt (shared/cpu-performance-notes.md).
LLAMA_CPP_SINGLE_STREAM_TOK_S = 100.0
TARGET_RATIO = 2.0
TARGET_LLAMA_CPP_MULTIPLE = 3.0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "engine", help="decode tokens/s of the engine vs transformers, with hardware floors",
        description="Decode speed of the model engine against transformers eager on the same "
        "weights (default: SmolLM2-135M-Instruct from its GGUF) in the same run.")
    p.add_argument("--model", help="HF directory, .gguf file or preset (default: SmolLM2 GGUF)")
    p.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per sequence")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per repeat")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    p.add_argument("--warmup-steps", type=int, default=4, help="decode steps of the warm-up")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    p.add_argument("--no-reference", action="store_true", help="skip transformers")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _batches(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ValueError(f"--batches must be comma-separated integers, got {text!r}") from exc
    if not values or min(values) < 1:
        raise ValueError("--batches needs positive batch sizes")
    return values


def _check(args: argparse.Namespace, cfg: Any) -> None:
    for name in ("prompt_len", "steps", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup_steps < 1:
        raise ValueError("--warmup-steps must be >= 1")
    if args.prompt_len + max(args.steps, args.warmup_steps) + 1 > cfg.max_position:
        raise ValueError(f"--prompt-len + --steps exceeds the model's context "
                         f"of {cfg.max_position}")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from coordinator.commands import _engine_bench as eb
    from coordinator.commands.generate import load_spec

    if args.threads:
        torch.set_num_threads(args.threads)
    batches = _batches(args.batches)
    spec = load_spec(args)
    cfg = spec.config
    _check(args, cfg)
    machine = {"copy_bandwidth_Bps": eb.copy_bandwidth(),
               "matmul_peak_flops": eb.matmul_peak(getattr(torch, args.dtype))}
    decoders = [eb.EngineDecoder(spec, args.dtype)]
    if not args.no_reference:
        decoders.append(eb.TransformersDecoder(spec, args.dtype))
    rows = []
    for batch in batches:
        prompts = eb.make_prompts(cfg, batch, args.prompt_len, args.seed + batch)
        timings = eb.time_decoders(decoders, prompts, args.steps, args.repeats,
                                   args.warmup_steps)
        rows.append(_row(cfg, batch, args, timings, machine))
        print(f"  batch {batch}: done", file=sys.stderr, flush=True)
    return {"model": args.model, "model_name": cfg.name, "dtype": args.dtype,
            "prompt_len": args.prompt_len, "steps": args.steps, "repeats": args.repeats,
            "hardware": eb.hardware(), "machine": machine, "rows": rows,
            "targets": _targets(rows)}


def _row(cfg: Any, batch: int, args: argparse.Namespace, timings: dict[str, Any],
         machine: dict[str, float]) -> dict[str, Any]:
    from coordinator.commands import _engine_bench as eb

    dtype_bytes = 2 if args.dtype == "bfloat16" else 4
    context = args.prompt_len + (args.steps + 1) / 2  # mean context over the timed steps
    weight_bytes, kv_bytes = eb.step_bytes(cfg, batch, context, dtype_bytes)
    flops = eb.step_flops(cfg, batch, context)
    ours = timings["exegpt"]
    row: dict[str, Any] = {
        "batch": batch, "exegpt_ms_per_step": ours.ms_per_step,
        "exegpt_tok_s": ours.tokens_per_s, "exegpt_step_ms_repeats": ours.step_ms_repeats,
        "exegpt_prefill_ms": ours.prefill_ms, "weight_bytes_per_step": weight_bytes,
        "kv_bytes_per_step": kv_bytes, "flops_per_step": flops,
        "bw_floor_ms": 1000.0 * weight_bytes / machine["copy_bandwidth_Bps"],
        "bw_kv_floor_ms": 1000.0 * (weight_bytes + kv_bytes) / machine["copy_bandwidth_Bps"],
        "compute_floor_ms": 1000.0 * flops / machine["matmul_peak_flops"],
    }
    ref = timings.get("transformers")
    if ref is not None:
        row |= {"transformers_ms_per_step": ref.ms_per_step, "transformers_tok_s": ref.tokens_per_s,
                "transformers_step_ms_repeats": ref.step_ms_repeats,
                "transformers_prefill_ms": ref.prefill_ms,
                "ratio": ours.tokens_per_s / ref.tokens_per_s}
    return row


def _targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"llama_cpp_reference_tok_s": LLAMA_CPP_SINGLE_STREAM_TOK_S}
    ratios = [r["ratio"] for r in rows if "ratio" in r]
    if ratios:
        out["min_ratio"] = min(ratios)
        out["ratio_target_met"] = min(ratios) >= TARGET_RATIO
    big = [r for r in rows if r["batch"] == 32]
    if big:
        need = TARGET_LLAMA_CPP_MULTIPLE * LLAMA_CPP_SINGLE_STREAM_TOK_S
        out["batch32_tok_s"] = big[0]["exegpt_tok_s"]
        out["batch32_vs_llama_cpp"] = big[0]["exegpt_tok_s"] / LLAMA_CPP_SINGLE_STREAM_TOK_S
        out["batch32_target_met"] = big[0]["exegpt_tok_s"] >= need
    return out


def _print_report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    hw, machine = result["hardware"], result["machine"]
    console = Console(width=None if sys.stdout.isatty() else 132)
    console.print(f"[bold]exegpt bench engine[/]: {result['model_name']} ({result['model']}), "
                  f"{result['dtype']}, prompt {result['prompt_len']} tokens, "
                  f"{result['steps']} decode steps x {result['repeats']} repeats (median)")
    console.print(f"hardware: {hw['cpu']}, {hw['logical_cpus']} logical CPUs, torch {hw['torch']}"
                  f", {hw['threads']} threads; copy bandwidth "
                  f"{machine['copy_bandwidth_Bps'] / 1e9:.1f} GB/s (read+write), "
                  f"{result['dtype']} matmul peak {machine['matmul_peak_flops'] / 1e9:.0f} GFLOP/s")
    load, cpus = hw.get("load_avg_1m_at_end"), hw["logical_cpus"] or 1
    if load is not None and load > cpus:
        console.print(f"[yellow]warning[/]: load average {load:.1f} on {cpus} CPUs: other "
                      "processes shared the cores, absolute times are inflated (with more than "
                      "one torch thread, badly); compare the ratio, measured in the same run")
    table = Table(show_lines=False)
    for col in ("batch", "ours ms/step", "ours tok/s", "HF ms/step", "HF tok/s", "ratio",
                "BW floor ms", "BW+KV floor ms", "compute floor ms", "ours / BW floor"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        has_ref = "ratio" in r
        table.add_row(
            str(r["batch"]), f"{r['exegpt_ms_per_step']:.1f}", f"{r['exegpt_tok_s']:.1f}",
            f"{r['transformers_ms_per_step']:.1f}" if has_ref else "-",
            f"{r['transformers_tok_s']:.1f}" if has_ref else "-",
            f"{r['ratio']:.2f}x" if has_ref else "-",
            f"{r['bw_floor_ms']:.2f}", f"{r['bw_kv_floor_ms']:.2f}",
            f"{r['compute_floor_ms']:.2f}", f"{r['exegpt_ms_per_step'] / r['bw_floor_ms']:.1f}x")
    console.print(table)
    console.print("HF = transformers LlamaForCausalLM (eager, default attention, KV cache) on the "
                  "same weights; BW floor = weight bytes per step / copy bandwidth (+KV adds the "
                  "cache reads); compute floor = FLOPs per step / matmul peak.")
    _print_targets(console, result["targets"])


def _print_targets(console: Any, targets: dict[str, Any]) -> None:
    def verdict(ok: bool) -> str:
        return "[green]met[/]" if ok else "[red]not met[/]"

    if "min_ratio" in targets:
        console.print(f"target >= {TARGET_RATIO:.0f}x transformers at every batch: min ratio "
                      f"{targets['min_ratio']:.2f}x -> {verdict(targets['ratio_target_met'])}")
    if "batch32_tok_s" in targets:
        console.print(
            f"target >= {TARGET_LLAMA_CPP_MULTIPLE:.0f}x llama.cpp single stream at batch 32: "
            f"{targets['batch32_tok_s']:.0f} tok/s = {targets['batch32_vs_llama_cpp']:.2f}x "
            f"~{LLAMA_CPP_SINGLE_STREAM_TOK_S:.0f} tok/s -> "
            f"{verdict(targets['batch32_target_met'])}"
            "  (llama.cpp figure: reference measured earlier on this kind of machine, "
            "shared/cpu-performance-notes.md; not measured in this run)")


def run(args: argparse.Namespace) -> int:
    try:
        result = measure(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"exegpt bench engine: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        _print_report(result)
    return 0
