"""Everything the coordinator sends to clients: coalesced StreamChunks, Results, Errors.

Tokens for a request are buffered until the end of the current pump (one wake-up of the event
loop), then sent as one StreamChunk whose ``index`` is the output position of its first token.
A Result or Error flushes that request's chunk first, so a client always sees chunks in order,
then exactly one final message.

Sends are non-blocking on a ROUTER with ROUTER_MANDATORY: a client that vanished (unknown
routing id) or stopped reading (its queue is full) costs a log line, never a stalled loop.
"""

from __future__ import annotations

from typing import Any

import zmq

from common import protocol as P
from common.errors import ServerError
from coordinator.requests import Request


class Relay:
    def __init__(self, sock: zmq.Socket, log: Any, counters: dict[str, int],
                 tokenizer: Any = None) -> None:
        self.sock = sock
        self.tokenizer = tokenizer  # decodes the Result text of text-prompt requests
        self.log = log
        self.counters = counters
        self.counters.setdefault("undeliverable", 0)
        self._chunks: dict[str, tuple[bytes, int, list[int]]] = {}

    def chunk(self, request: Request, start: int, tokens: tuple[int, ...]) -> None:
        pending = self._chunks.get(request.req_id)
        if pending is None:
            self._chunks[request.req_id] = (request.client, start, list(tokens))
        else:
            pending[2].extend(tokens)

    def flush(self) -> None:
        chunks, self._chunks = self._chunks, {}
        for req_id, (client, start, tokens) in chunks.items():
            self.send_now(client, P.StreamChunk(req_id=req_id, index=start, tokens=tuple(tokens)))

    def _flush_one(self, req_id: str) -> None:
        pending = self._chunks.pop(req_id, None)
        if pending is not None:
            client, start, tokens = pending
            self.send_now(client, P.StreamChunk(req_id=req_id, index=start, tokens=tuple(tokens)))

    def result(self, request: Request, reason: str) -> None:
        self._flush_one(request.req_id)
        text = None
        if request.text_prompt and self.tokenizer is not None:
            text = self.tokenizer.decode(request.tokens)
        self.send_now(request.client, P.Result(
            req_id=request.req_id, tokens=tuple(request.tokens), finish_reason=reason,
            text=text, num_prompt_tokens=request.num_prompt_tokens,
            lifecycle=request.times.lifecycle()))

    def error(self, request: Request, exc: ServerError) -> None:
        self._flush_one(request.req_id)
        self.send_now(request.client, P.Error(code=exc.code, message=exc.message,
                                              req_id=request.req_id,
                                              retry_after_s=exc.retry_after_s))

    def send_now(self, client: bytes, msg: P.Message) -> None:
        try:
            self.sock.send_multipart([client, *P.encode(msg)], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: client gone; EAGAIN: not reading
            self.counters["undeliverable"] += 1
            self.log.warning("client_unreachable", client=client.hex(),
                             req_id=getattr(msg, "req_id", None), error=exc.strerror)
