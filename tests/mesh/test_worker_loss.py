"""A worker SIGKILLed mid-stream loses no request: what it held is re-run on a survivor from its
prompt plus the tokens already streamed, and every client sees one continuous stream.

The checks read the raw wire (a DEALER, not the SDK, which would hide duplicates by index):
each request's StreamChunks must start exactly where the previous one ended, their tokens must
equal the null model's undisturbed output (a function of prompt and position), and exactly one
Result must come, equal to the stream.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import zmq

from common import protocol as P
from common.backend import null_tokens
from common.sockets import make_socket
from coordinator.launch import LaunchSpec, LocalMesh, WorkerGroup
from coordinator.requests import Request, RequestTable

VOCAB = 256


def test_a_rerun_carries_the_streamed_tokens_under_a_new_wire_id() -> None:
    table = RequestTable()
    request = Request(req_id="r", client=b"c", prompt=(4, 5), max_new_tokens=10,
                      sampling=P.Sampling(), stream=True, deadline=None)
    table.admit(request)
    table.dequeue(request)
    request.start_encode("enc0", "dec0")
    request.add_tokens((7, 8, 9), now=1.0)
    table.requeue(request)
    assert request.rerun_input() == ((4, 5, 7, 8, 9), 7, 3)
    assert request.wire_id == "r~rerun1" and table.num_queued == 1
    assert table.get_wire("r~rerun1") is request
    assert table.get_wire("r") is None  # the lost run's late tokens resolve to nothing
    assert table.get("r") is request  # clients still name it by their id
    table.remove("r")
    assert table.get_wire("r~rerun1") is None and table.num_for(b"c") == 0


@dataclass
class Seen:
    chunks: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # monotonic arrival of each chunk
    results: list[P.Result] = field(default_factory=list)
    errors: list[P.Error] = field(default_factory=list)

    def check(self, expected: list[int]) -> None:
        assert not self.errors, self.errors
        assert len(self.results) == 1, f"{len(self.results)} results"
        position = 0
        for index, tokens in self.chunks:
            assert index == position, f"chunk at {index}, expected {position} (gap or repeat)"
            position += len(tokens)
        streamed = [t for _, tokens in self.chunks for t in tokens]
        assert streamed == expected
        assert list(self.results[0].tokens) == expected


def recovery_s(seen: dict[str, Seen], killed_at: float) -> float:
    """Longest stall of a request that was streaming when the worker died: kill -> its
    next token (detection by heartbeat deadline + re-encode + first token of the re-run)."""
    stalls = [next(t for t in s.times if t > killed_at) - killed_at for s in seen.values()
              if any(t < killed_at for t in s.times) and any(t > killed_at for t in s.times)]
    return max(stalls, default=0.0)


def run_requests(endpoint: str, prompts: dict[str, tuple[int, ...]], max_new: int,
                 during: object, timeout_s: float = 40.0) -> dict[str, Seen]:
    ctx = zmq.Context()
    sock = make_socket(ctx, "DEALER", connect=endpoint)
    seen = {req_id: Seen() for req_id in prompts}
    try:
        for req_id, prompt in prompts.items():
            sock.send_multipart(P.encode(P.Submit(req_id, prompt_ids=prompt, stream=True,
                                                  max_new_tokens=max_new, timeout_s=timeout_s)))
        started, acted = time.monotonic(), False
        deadline = started + timeout_s
        while sum(len(s.results) + len(s.errors) for s in seen.values()) < len(prompts):
            # the kill marker (an extra key) never gets results: only prompts count
            assert time.monotonic() < deadline, "requests did not finish"
            if not acted and time.monotonic() - started > 0.8:
                during()  # type: ignore[operator]
                acted = True
                seen["__killed_at__"] = Seen(times=[time.monotonic()])
            if not sock.poll(100):
                continue
            msg = P.decode(sock.recv_multipart())
            entry = seen[msg.req_id]  # type: ignore[union-attr]
            if isinstance(msg, P.StreamChunk):
                entry.chunks.append((msg.index, msg.tokens))
                entry.times.append(time.monotonic())
            elif isinstance(msg, P.Result):
                entry.results.append(msg)
            elif isinstance(msg, P.Error):
                entry.errors.append(msg)
        time.sleep(0.3)  # anything late (a duplicate Result) would land now
        while sock.poll(0):
            msg = P.decode(sock.recv_multipart())
            pytest.fail(f"message after the end: {msg}")
    finally:
        sock.close(linger=0)
        ctx.term()
    return seen


def _spec(tmp: object, encoders: int, decoders: int, **kw: float) -> LaunchSpec:
    return LaunchSpec(groups=(WorkerGroup("encoder", encoders), WorkerGroup("decoder", decoders)),
                      runs_path=tmp, transport="ipc", heartbeat_interval_s=0.2,  # type: ignore[arg-type]
                      heartbeat_timeout_s=1.0, drain_timeout_s=1.0, **kw)


@pytest.fixture
def two_decoders(tmp_path: object) -> Iterator[LocalMesh]:
    with LocalMesh(_spec(tmp_path, 1, 2, decode_cost_ms=10.0)) as mesh:
        yield mesh


def _kill(mesh: LocalMesh, name: str) -> object:
    victim = next(c for c in mesh.workers if c.name == name)

    def kill() -> None:
        os.kill(victim.pid, signal.SIGKILL)
    return kill


def test_sigkilled_decoder_requests_finish_on_the_survivor(two_decoders: LocalMesh) -> None:
    prompts = {f"r{i}": (i, i + 1, 3) for i in range(24)}
    t0 = time.monotonic()
    seen = run_requests(two_decoders.client_endpoint, prompts, 250,
                        _kill(two_decoders, "decoder-dec0"))
    killed_at = seen.pop("__killed_at__").times[0]
    for req_id, prompt in prompts.items():
        seen[req_id].check(null_tokens(prompt, 250, VOCAB))
    print(f"\nWORKER_LOSS decoder: requests={len(prompts)} completed="
          f"{sum(len(s.results) for s in seen.values())} errors="
          f"{sum(len(s.errors) for s in seen.values())} recovery_s="
          f"{recovery_s(seen, killed_at):.2f}")
    with_tokens_before = sum(1 for s in seen.values() if len(s.chunks) > 1)
    assert with_tokens_before > 0
    assert time.monotonic() - t0 < 30
    log = (two_decoders.spec.run_dir / "coordinator.jsonl").read_text()
    assert '"request_rerun"' in log and '"worker_lost"' in log


@pytest.fixture
def two_encoders(tmp_path: object) -> Iterator[LocalMesh]:
    """Encoding is slow (0.5 s per batch) so a batch can be caught inside an encoder."""
    with LocalMesh(_spec(tmp_path, 2, 1, encode_cost_ms=500.0, decode_cost_ms=5.0,
                         encode_batch=4)) as mesh:
        yield mesh


def test_sigkilled_encoder_batch_is_encoded_again(two_encoders: LocalMesh) -> None:
    prompts = {f"e{i}": (i + 1,) for i in range(12)}
    seen = run_requests(two_encoders.client_endpoint, prompts, 30,
                        _kill(two_encoders, "encoder-enc0"))
    seen.pop("__killed_at__")
    for req_id, prompt in prompts.items():
        seen[req_id].check(null_tokens(prompt, 30, VOCAB))
    log = (two_encoders.spec.run_dir / "coordinator.jsonl").read_text()
    assert '"request_rerun"' in log


def test_without_a_survivor_of_the_role_the_error_says_so(tmp_path: object) -> None:
    with LocalMesh(_spec(tmp_path, 1, 1, decode_cost_ms=10.0)) as mesh:
        prompts = {f"x{i}": (i + 2,) for i in range(4)}
        seen = run_requests(mesh.client_endpoint, prompts, 400, _kill(mesh, "decoder-dec0"))
    seen.pop("__killed_at__")
    for entry in seen.values():
        assert not entry.results and len(entry.errors) == 1
        assert entry.errors[0].code == "worker_lost"
        assert "no decoder worker remains" in entry.errors[0].message
