"""Coordinator settings: one frozen value from args or environment (docker-compose uses env)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"EXEGPT_{name}", default)


def check_endpoint(endpoint: str, what: str) -> None:
    if not endpoint.startswith(("ipc://", "tcp://", "inproc://")):
        raise ValueError(f"{what} endpoint {endpoint!r} must start with ipc:// or tcp://")


@dataclass(frozen=True)
class CoordinatorConfig:
    """Where to listen, what mesh to expect and the control-plane limits.

    ``heartbeat_timeout_s`` is how long a worker may stay silent before its requests fail;
    ``drain_timeout_s`` is how long SIGTERM waits for in-flight requests before erroring them.
    """

    client_endpoint: str
    worker_endpoint: str
    num_encoders: int = 1
    num_decoders: int = 1
    max_encode_batch: int = 16
    max_outstanding_batches: int = 2
    max_queued: int = 100_000
    max_prompt_tokens: int = 8192
    max_new_tokens: int = 8192
    heartbeat_interval_s: float = 0.5
    heartbeat_timeout_s: float = 5.0
    drain_timeout_s: float = 10.0
    model_shape: str = "tiny-llama"
    model_config: str | None = None  # JSON file of the served model's ModelConfig
    tokenizer: str | None = None  # the model's HF directory or .gguf (text prompts)
    adjust_token_sum: str | None = None  # "LO,HI": the plan's band for an encode batch's tokens
    adjust_decode_batch: str | None = None  # "LO,HI": the plan's band for the decode batch
    ready_fd: int | None = None

    def __post_init__(self) -> None:
        check_endpoint(self.client_endpoint, "client")
        check_endpoint(self.worker_endpoint, "worker")
        for name in ("num_encoders", "num_decoders"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (the mesh needs both roles)")
        for name in ("max_encode_batch", "max_outstanding_batches", "max_queued",
                     "max_prompt_tokens", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.heartbeat_interval_s < self.heartbeat_timeout_s:
            raise ValueError("need 0 < heartbeat_interval_s < heartbeat_timeout_s "
                             f"(got {self.heartbeat_interval_s}, {self.heartbeat_timeout_s})")
        if self.drain_timeout_s < 0:
            raise ValueError("drain_timeout_s must be >= 0")
        from coordinator.adjust import Band

        Band.parse(self.adjust_token_sum)  # a malformed band fails at startup, with its text
        Band.parse(self.adjust_decode_batch)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m coordinator``; each defaults to ``EXEGPT_<NAME>`` when set."""
    parser.epilog = ("Environment: each --some-flag defaults to EXEGPT_SOME_FLAG when set; "
                     "--client-endpoint reads EXEGPT_COORDINATOR_ENDPOINT (the variable clients "
                     "use too) and --worker-endpoint EXEGPT_WORKER_ENDPOINT.")
    add = parser.add_argument
    add("--client-endpoint", default=_env("COORDINATOR_ENDPOINT", "tcp://127.0.0.1:5555"),
        help="where clients connect (bind); tcp://host:* picks a free port")
    add("--worker-endpoint", default=_env("WORKER_ENDPOINT", "tcp://127.0.0.1:5556"),
        help="where workers connect (bind)")
    add("--encoders", type=int, default=int(_env("ENCODERS", "1") or 1),
        help="encoder workers (TP ranks count separately) to wait for before serving")
    add("--decoders", type=int, default=int(_env("DECODERS", "1") or 1))
    add("--encode-batch", type=int, default=int(_env("ENCODE_BATCH", "16") or 16),
        help="max requests per encode batch (the plan's B_E)")
    add("--max-queued", type=int, default=int(_env("MAX_QUEUED", "100000") or 100000))
    add("--heartbeat-interval", type=float,
        default=float(_env("HEARTBEAT_INTERVAL", "0.5") or 0.5))
    add("--heartbeat-timeout", type=float, default=float(_env("HEARTBEAT_TIMEOUT", "5") or 5))
    add("--drain-timeout", type=float, default=float(_env("DRAIN_TIMEOUT", "10") or 10))
    add("--model-shape", default=_env("MODEL_SHAPE", "tiny-llama"),
        help="ModelConfig preset the workers size their work by")
    add("--model-config", default=_env("MODEL_CONFIG"),
        help="JSON file with the served model's ModelConfig (overrides --model-shape)")
    add("--tokenizer", default=_env("TOKENIZER"),
        help="HF model directory (tokenizer.json) or .gguf whose tokenizer turns text "
             "prompts into ids and outputs back into text")
    add("--adjust-token-sum", default=_env("ADJUST_TOKEN_SUM"),
        help="LO,HI: keep each encode batch's input-token sum in this band by adjusting B_E "
             "(the plan's adjust.token_sum)")
    add("--adjust-decode-batch", default=_env("ADJUST_DECODE_BATCH"),
        help="LO,HI: keep the decoders' running batch in this band by adjusting B_E "
             "(the plan's adjust.decode_batch)")
    add("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)


def from_args(args: argparse.Namespace) -> CoordinatorConfig:
    return CoordinatorConfig(
        client_endpoint=args.client_endpoint, worker_endpoint=args.worker_endpoint,
        num_encoders=args.encoders, num_decoders=args.decoders,
        max_encode_batch=args.encode_batch, max_queued=args.max_queued,
        heartbeat_interval_s=args.heartbeat_interval, heartbeat_timeout_s=args.heartbeat_timeout,
        drain_timeout_s=args.drain_timeout, model_shape=args.model_shape,
        model_config=args.model_config,
        tokenizer=args.tokenizer, adjust_token_sum=args.adjust_token_sum,
        adjust_decode_batch=args.adjust_decode_batch, ready_fd=args.ready_fd,
    )
