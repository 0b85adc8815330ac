"""A bare DEALER client for the end-to-end mesh tests (tests/mesh, tests/runner): it sends
Submit frames itself and keeps every message the server answers, so tests can check framing
and ordering the SDK would hide."""

from __future__ import annotations

import random

import pytest
import zmq

from common import protocol as P

Work = list[tuple[str, tuple[int, ...], int]]  # (req_id, prompt ids, max_new_tokens)


def random_work(n: int, seed: int, longest: int = 40, vocab: int = 256,
                prefix: str | None = None) -> Work:
    """``n`` requests with prompts and outputs of 1..``longest`` tokens (ids ``prefix`` + i)."""
    rng = random.Random(seed)
    prefix = f"q{seed}-" if prefix is None else prefix
    return [(f"{prefix}{i}", tuple(rng.randrange(vocab) for _ in range(rng.randint(1, longest))),
             rng.randint(1, longest)) for i in range(n)]


def raw_roundtrip(endpoint: str, work: Work, timeout_ms: int = 30_000,
                  ) -> dict[str, list[P.Message]]:
    """Every message the server sends for each request, as it arrived; fails if anything
    arrives after the last request's final message."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
    sock.connect(endpoint)
    for req_id, prompt, n in work:
        sock.send_multipart(P.encode(P.Submit(req_id=req_id, prompt_ids=prompt,
                                              max_new_tokens=n, stream=True)))
    got: dict[str, list[P.Message]] = {req_id: [] for req_id, _, _ in work}
    finals = 0
    try:
        while finals < len(work):
            msg = P.decode(sock.recv_multipart())
            got[msg.req_id].append(msg)  # type: ignore[attr-defined]
            finals += isinstance(msg, P.Result | P.Error)
        sock.setsockopt(zmq.RCVTIMEO, 300)  # nothing more may arrive
        with pytest.raises(zmq.Again):
            sock.recv_multipart()
    finally:
        sock.close(linger=0)
        ctx.term()
    return got
