"""Turning a client's Submit into an admitted Request, or into the error that says why not."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from common import protocol as P
from common.errors import BadRequest, Overloaded, ServerError, ShuttingDown
from coordinator.config import CoordinatorConfig
from coordinator.requests import Request, RequestTable


def admit(msg: P.Submit, client: bytes, cfg: CoordinatorConfig, table: RequestTable,
          draining: bool, vocab_size: int, *, tokenizer: Any = None,
          max_position: int | None = None) -> Request:
    """Validate against the server's limits; raises a ServerError subclass to answer with.

    ``tokenizer`` (the served model's, torch-free) turns text prompts into ids;
    ``max_position`` (the model's context) rejects prompts that cannot fit."""
    if draining:
        raise ShuttingDown("the server is shutting down and takes no new requests",
                           req_id=msg.req_id)
    text_prompt = msg.prompt_ids is None
    if text_prompt:
        msg = _tokenize(msg, tokenizer)
    _check_limits(msg, cfg, vocab_size)
    assert msg.prompt_ids is not None
    if max_position is not None and len(msg.prompt_ids) >= max_position:
        raise BadRequest(f"prompt has {len(msg.prompt_ids)} tokens; the model's context is "
                         f"{max_position} tokens (prompt plus output): shorten the prompt",
                         req_id=msg.req_id)
    if table.num_queued >= cfg.max_queued:
        raise Overloaded(f"{table.num_queued} requests are queued (limit {cfg.max_queued})",
                         req_id=msg.req_id, retry_after_s=1.0)
    if msg.req_id in table:
        raise BadRequest(f"request id {msg.req_id!r} is already in flight; use a unique id",
                         req_id=msg.req_id)
    now = time.time()
    deadline = None if msg.timeout_s is None else now + msg.timeout_s
    request = Request(req_id=msg.req_id, client=client, prompt=msg.prompt_ids,
                      max_new_tokens=msg.max_new_tokens, sampling=msg.sampling,
                      stream=msg.stream, deadline=deadline, text_prompt=text_prompt)
    request.times.t_arrival = now
    table.admit(request)
    return request


def _tokenize(msg: P.Submit, tokenizer: Any) -> P.Submit:
    if msg.prompt is None:
        raise BadRequest("a request needs prompt (text) or prompt_ids", req_id=msg.req_id)
    if tokenizer is None:
        raise BadRequest("this server takes token ids (prompt_ids); text prompts need a "
                         "model with a tokenizer", req_id=msg.req_id)
    try:
        if msg.chat:
            ids = tokenizer.encode_chat([{"role": "user", "content": msg.prompt}])
        else:
            ids = tokenizer.encode(msg.prompt)
    except ValueError as exc:  # e.g. chat asked of a model without a chat template
        raise BadRequest(f"cannot tokenize the prompt: {exc}", req_id=msg.req_id) from exc
    if not ids:
        raise BadRequest("the prompt tokenizes to no tokens", req_id=msg.req_id)
    return dataclasses.replace(msg, prompt=None, prompt_ids=tuple(ids))


def _check_limits(msg: P.Submit, cfg: CoordinatorConfig, vocab_size: int) -> None:
    assert msg.prompt_ids is not None
    if len(msg.prompt_ids) > cfg.max_prompt_tokens:
        raise BadRequest(f"prompt has {len(msg.prompt_ids)} tokens, over the limit of "
                         f"{cfg.max_prompt_tokens}", req_id=msg.req_id)
    if msg.max_new_tokens > cfg.max_new_tokens:
        raise BadRequest(f"max_new_tokens {msg.max_new_tokens} is over the limit of "
                         f"{cfg.max_new_tokens}", req_id=msg.req_id)
    bad = [t for t in msg.prompt_ids if t >= vocab_size]
    if bad:
        raise BadRequest(f"token id {bad[0]} is outside the vocabulary (size {vocab_size})",
                         req_id=msg.req_id)


def error_message(exc: ServerError) -> P.Error:
    return P.Error(code=exc.code, message=exc.message, req_id=exc.req_id,
                   retry_after_s=exc.retry_after_s)
