"""Talking to a running mesh from the CLI: ``--connect`` and the CURVE key flags.

``exegpt generate --connect tcp://host:5555`` sends the prompt to a serving coordinator instead
of loading the model here; ``exegpt stats`` always connects. With a CURVE-protected server both
take ``--server-key`` (the server.key file or its 40-character key) and ``--client-key`` (this
client's .key_secret file), or ``EXEGPT_CURVE_SERVER_PUBLIC`` / ``EXEGPT_CURVE_CLIENT_KEY``.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

ENV_SERVER_PUBLIC = "EXEGPT_CURVE_SERVER_PUBLIC"  # the names common.client reads
ENV_CLIENT_KEY = "EXEGPT_CURVE_CLIENT_KEY"


def add_curve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server-key", default=os.environ.get(ENV_SERVER_PUBLIC),
                   help="CURVE: the server's public key file (keys/server.key) or key text "
                        f"(${ENV_SERVER_PUBLIC})")
    p.add_argument("--client-key", default=os.environ.get(ENV_CLIENT_KEY),
                   help=f"CURVE: this client's .key_secret file (${ENV_CLIENT_KEY})")


def apply_curve_args(args: argparse.Namespace) -> None:
    """Hand the key flags to every SDK client this process makes (the SDK reads the env)."""
    if args.server_key:
        os.environ[ENV_SERVER_PUBLIC] = args.server_key
    if args.client_key:
        os.environ[ENV_CLIENT_KEY] = args.client_key


def generate_remote(args: argparse.Namespace) -> dict[str, Any]:
    """One request through the SDK; the server tokenizes --prompt (and applies --chat)."""
    from common.client import Client
    from common.errors import ExegptError

    apply_curve_args(args)
    if args.prompt_ids is not None:
        ids = [int(p) for p in args.prompt_ids.replace(" ", "").split(",") if p]
        kwargs: dict[str, Any] = {"prompt_ids": ids}
    else:
        kwargs = {"chat": bool(args.chat)}
    sampled = args.temperature is not None and args.temperature > 0
    start = time.perf_counter()
    try:
        with Client(args.connect, default_timeout_s=args.timeout) as client:
            result = client.generate(
                args.prompt if args.prompt_ids is None else None,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature if sampled else 0.0, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed, **kwargs)
    except (ExegptError, ValueError) as exc:
        raise ValueError(f"{args.connect}: {exc}") from exc
    return {"model": f"server at {args.connect}", "prompt_ids": kwargs.get("prompt_ids"),
            "chat_template": bool(kwargs.get("chat")), "token_ids": list(result.tokens),
            "text": result.text, "finish_reason": result.finish_reason,
            "num_prompt_tokens": result.num_prompt_tokens,
            "seconds": round(time.perf_counter() - start, 3), "dtype": None, "tp": None,
            "stages": None}
