"""Turning a client's Submit into an admitted Request, or into the error that says why not.

Limits, in the order they are checked (each answered with a typed error, never a silent drop):

    draining                      -> shutting_down
    text without a tokenizer, ... -> bad_request     (prompt too long, max_new_tokens too big,
                                                      ids outside the vocabulary, context)
    queue at --max-queued          -> overloaded, retry_after_s = time for the queue to drain
                                                  below the limit at the current drain rate
    client at --max-client-requests-> overloaded, retry_after_s = time until one of that
                                                  client's requests is answered
    duplicate req_id              -> bad_request

Why a drain rate and not a constant: a client told to come back in 1 s while the server needs
30 s to make room only adds load. :class:`DrainMeter` measures how many requests the server
answered over the last few seconds, so the estimate follows the real service rate.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from typing import Any

from common import protocol as P
from common.errors import BadRequest, Overloaded, ServerError, ShuttingDown
from coordinator.config import CoordinatorConfig
from coordinator.requests import Request, RequestTable

MIN_RETRY_S = 0.05
MAX_RETRY_S = 60.0


class DrainMeter:
    """Answered requests per second over the last ``window_s`` (a sliding window of samples).

    ``observe(now, done_total)`` takes the server's running count of answered requests
    (completed + failed); samples closer than ``min_gap_s`` are merged so memory stays bounded.
    """

    def __init__(self, window_s: float = 10.0, min_gap_s: float = 0.1) -> None:
        if window_s <= 0 or min_gap_s < 0:
            raise ValueError("DrainMeter needs window_s > 0 and min_gap_s >= 0")
        self.window_s = window_s
        self.min_gap_s = min_gap_s
        self._samples: deque[tuple[float, int]] = deque()

    def observe(self, now: float, done_total: int) -> None:
        if self._samples and now - self._samples[-1][0] < self.min_gap_s:
            self._samples[-1] = (self._samples[-1][0], done_total)
        else:
            self._samples.append((now, done_total))
        # keep one sample at or before the window's start: the base of the rate
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window_s:
            self._samples.popleft()

    def rate(self) -> float | None:
        """Requests answered per second, or None before two samples span any time."""
        if len(self._samples) < 2:
            return None
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None

    def seconds_for(self, num_requests: float) -> float:
        """How long the server needs to answer ``num_requests`` more, clamped to a sane range.

        With no measured progress (nothing answered in the window) the answer is the window
        itself: nothing suggests room will appear sooner."""
        rate = self.rate()
        if not rate:
            return min(MAX_RETRY_S, self.window_s)
        return min(MAX_RETRY_S, max(MIN_RETRY_S, num_requests / rate))


class LogBudget:
    """At most ``per_second`` log lines of one kind per second; the lines skipped are counted
    and reported by the next one let through (hostile input must not become a disk flood)."""

    def __init__(self, per_second: int = 20) -> None:
        if per_second < 1:
            raise ValueError("LogBudget needs per_second >= 1")
        self.per_second = per_second
        self._second = -1
        self._used = 0
        self._skipped = 0

    def allow(self, now: float) -> int | None:
        """None: skip this line; else log it, with this many skipped since the last one."""
        second = int(now)
        if second != self._second:
            self._second, self._used = second, 0
        if self._used >= self.per_second:
            self._skipped += 1
            return None
        self._used += 1
        skipped, self._skipped = self._skipped, 0
        return skipped


def admit(msg: P.Submit, client: bytes, cfg: CoordinatorConfig, table: RequestTable,
          draining: bool, vocab_size: int, *, tokenizer: Any = None,
          max_position: int | None = None, drain: DrainMeter | None = None) -> Request:
    """Validate against the server's limits; raises a ServerError subclass to answer with.

    ``tokenizer`` (the served model's, torch-free) turns text prompts into ids;
    ``max_position`` (the model's context) rejects prompts that cannot fit; ``drain`` (fed by
    the caller) turns an overload into a retry-after estimate."""
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
    _check_load(msg.req_id, client, cfg, table, drain or DrainMeter())
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


def _check_load(req_id: str, client: bytes, cfg: CoordinatorConfig, table: RequestTable,
                drain: DrainMeter) -> None:
    """Bounded queues: the whole server's and each client's share of it."""
    if table.num_queued >= cfg.max_queued:
        excess = table.num_queued - cfg.max_queued + 1
        raise Overloaded(f"overloaded: {table.num_queued} requests are queued (limit "
                         f"{cfg.max_queued}); retry later", req_id=req_id,
                         retry_after_s=round(drain.seconds_for(excess), 3))
    mine = table.num_for(client)
    if mine >= cfg.max_client_requests:
        # this client's requests are answered at its share of the drain rate
        wait = drain.seconds_for(max(1.0, len(table) / mine))
        raise Overloaded(f"overloaded: this client has {mine} requests in flight (limit "
                         f"{cfg.max_client_requests} per client); wait for some to finish",
                         req_id=req_id, retry_after_s=round(wait, 3))


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
                         f"{cfg.max_prompt_tokens} (--max-prompt-tokens)", req_id=msg.req_id)
    if msg.max_new_tokens > cfg.max_new_tokens:
        raise BadRequest(f"max_new_tokens {msg.max_new_tokens} is over the limit of "
                         f"{cfg.max_new_tokens} (--max-new-tokens)", req_id=msg.req_id)
    bad = [t for t in msg.prompt_ids if t >= vocab_size]
    if bad:
        raise BadRequest(f"token id {bad[0]} is outside the vocabulary (size {vocab_size})",
                         req_id=msg.req_id)


def error_message(exc: ServerError) -> P.Error:
    return P.Error(code=exc.code, message=exc.message, req_id=exc.req_id,
                   retry_after_s=exc.retry_after_s)
