"""Hostile bytes at the real ports: a coordinator with null-model workers takes >= 10,000
malformed messages on its client port and thousands on a decoder's KV endpoint, while a
well-formed client keeps getting correct answers.

What must hold: every process stays alive, the coordinator's RSS stays bounded, and every
bad message is answered with an ``Error`` (both ports are ROUTERs: the sender is known), except
messages over the client port's MAXMSGSIZE, which libzmq drops with the connection before the
coordinator sees a byte. The in-process decoder fuzzing (hypothesis) is test_protocol_fuzz.py.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import msgpack
import numpy as np
import psutil
import pytest
import zmq

from common import protocol as P
from common.backend import null_tokens
from common.client import Client
from common.sockets import make_socket
from coordinator.launch import LaunchSpec, LocalMesh, WorkerGroup

VOCAB = 256
Frames = list[bytes]
Maker = Callable[[random.Random, int], Frames]


def _frames(msg: P.Message) -> Frames:
    return [bytes(f) for f in P.encode(msg)]


def _submit(i: int) -> P.Submit:
    return P.Submit(f"fz-{i}", prompt_ids=(1, 2, 3), max_new_tokens=4, timeout_s=5.0)


def _handoff(i: int) -> P.KVHandoff:
    kv = P.KVPayload(f"fz-{i}", 3, 0, 2, 0, 1, 1,
                     {"k": np.zeros((2, 1, 3, 512), np.float32),
                      "v": np.zeros((2, 1, 3, 512), np.float32)})
    return P.KVHandoff(f"fz-{i}", "fuzz", 5, 3, 4, P.Sampling(), kv, P.Lifecycle())


def _body(frames: Frames) -> dict:
    return msgpack.unpackb(frames[1], raw=False)


def _pack(type_byte: int, body: object, *rest: bytes) -> Frames:
    return [bytes((type_byte,)), msgpack.packb(body, use_bin_type=True), *rest]


# ---- malformed messages, one maker per category (each returns frames that must be refused)

def random_bytes(rng: random.Random, i: int) -> Frames:
    return [rng.randbytes(rng.randrange(0, 64)) for _ in range(rng.randrange(1, 5))]


def truncated(rng: random.Random, i: int) -> Frames:
    frames = _frames(rng.choice([_submit(i), P.Cancel(f"fz-{i}", "x"), P.StatsRequest(f"s{i}")]))
    if rng.random() < 0.1:
        return frames[:1]  # the type byte alone
    return [frames[0], frames[1][:rng.randrange(0, len(frames[1]))]]


CLIENT_TYPES = {P.Cancel.TYPE, P.StatsRequest.TYPE}


def wrong_type(rng: random.Random, i: int) -> Frames:
    source = rng.choice([_submit(i), P.Cancel(f"fz-{i}", "x"), P.StatsRequest(f"s{i}")])
    frames = _frames(source)
    choices = [t for t in P.message_types() if t != source.TYPE and t not in CLIENT_TYPES]
    choices += [0x00, 0x7F, 0xEE, 0xFF]
    return [bytes((rng.choice(choices),)), *frames[1:]]


def huge_shapes(rng: random.Random, i: int) -> Frames:
    kind = rng.randrange(3)
    if kind == 0:  # an array header declaring 4 billion prompt ids, followed by three
        head = msgpack.packb({"v": P.PROTOCOL_VERSION, "req_id": f"fz-{i}"})[1:]
        return [bytes((P.Submit.TYPE,)), b"\x83" + head + b"\xaaprompt_ids\xdd\xff\xff\xff\xff"
                + b"\x01\x02\x03"]
    if kind == 1:  # a tensor entry claiming [2^31, 2^31, 8] over a small frame
        frames = _frames(_handoff(i))
        body = _body(frames)
        body["kv"]["tensors"]["k"]["shape"] = [2**31, 2**31, 8]
        return _pack(frames[0][0], body, *frames[2:])
    body = _body(_frames(_submit(i)))  # over the array-length limit (1M ids)
    body["prompt_ids"] = [1] * ((1 << 20) + rng.randrange(1, 100))
    return _pack(P.Submit.TYPE, body)


def oversized(rng: random.Random, i: int) -> Frames:
    if rng.random() < 0.5:  # more frames than the limit
        return [bytes((P.Submit.TYPE,)), *[b"x"] * (P.DEFAULT_LIMITS.max_frames + 1)]
    body = _body(_frames(_submit(i)))  # a body over 16 MiB
    body["prompt"] = "a" * (P.DEFAULT_LIMITS.max_body_bytes + rng.randrange(1, 1000))
    body["prompt_ids"] = None
    return _pack(P.Submit.TYPE, body)


def deep_nesting(rng: random.Random, i: int) -> Frames:
    depth = rng.choice([40, 1000, 100_000])
    head = msgpack.packb({"v": P.PROTOCOL_VERSION, "req_id": f"fz-{i}"})[1:]
    nested = (b"\x91" if rng.random() < 0.5 else b"\x81\xa1a") * depth + b"\xc0"
    return [bytes((P.Submit.TYPE,)), b"\x83" + head + b"\xa6prompt" + nested]


def invalid_utf8(rng: random.Random, i: int) -> Frames:
    junk = rng.choice([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"ok\x80"])
    head = msgpack.packb({"v": P.PROTOCOL_VERSION, "max_new_tokens": 4})[1:]
    rid = msgpack.packb(f"fz-{i}")
    bad_str = bytes((0xA0 | len(junk),)) + junk
    if rng.random() < 0.5:  # the prompt
        return [bytes((P.Submit.TYPE,)), b"\x84" + head + b"\xa6req_id" + rid
                + b"\xa6prompt" + bad_str]
    return [bytes((P.Submit.TYPE,)), b"\x83" + head + b"\xa6req_id" + bad_str]


WRONG_VALUES: dict[str, list[object]] = {
    "req_id": [123, b"bytes", "", "x" * 300, None, [1]],
    "prompt_ids": ["abc", [1.5], [-1], [2**64 - 1], {"a": 1}, [[1]], [], [VOCAB + 5]],
    "max_new_tokens": ["5", 0, -3, 1.5, None, 2**64 - 1, 10**9],
    "sampling": [5, "x", [1], {"temperature": "hot"}, {"top_p": 7.0}, {"top_k": -1},
                 {"nope": 1}],
    "stream": ["yes", None, 3],
    "timeout_s": ["1", -1.0, 0.0, [1]],
    "chat": ["yes", 2],
    "v": [99, "2", None],
}


def wrong_field_types(rng: random.Random, i: int) -> Frames:
    body = _body(_frames(_submit(i)))
    key = rng.choice([*WRONG_VALUES, "extra", "missing_v"])
    if key == "extra":
        body[rng.choice(["hack", "__class__", "prompt_id"])] = 1
    elif key == "missing_v":
        del body["v"]
    else:
        body[key] = rng.choice(WRONG_VALUES[key])
    return _pack(P.Submit.TYPE, body)


CLIENT_MAKERS: dict[str, Maker] = {f.__name__: f for f in (
    random_bytes, truncated, wrong_type, huge_shapes, deep_nesting, invalid_utf8,
    wrong_field_types)}
RARE_MAKERS: dict[str, Maker] = {"oversized": oversized}  # megabytes each: a few dozen


def kv_tensor_lies(rng: random.Random, i: int) -> Frames:
    """KVHandoffs whose tensors lie: dtype, shape, frame index, byte length, ndim."""
    frames = _frames(_handoff(i))
    body = _body(frames)
    entry = body["kv"]["tensors"][rng.choice(["k", "v"])]
    lie = rng.randrange(5)
    if lie == 0:
        entry["dtype"] = rng.choice(["object", "float128", "", "<U8", 7])
    elif lie == 1:
        entry["shape"] = rng.choice([[2**40], [-1, 4], [1] * 40, "big", [2**62, 2**62]])
    elif lie == 2:
        entry["frame"] = rng.choice([-1, 99, 2**40, "0"])
    elif lie == 3:
        return [*frames[:2], *frames[2:3], frames[3][: rng.randrange(len(frames[3]))]]
    else:
        body["kv"]["seq_len"] = rng.choice([-5, "3", None])
    return _pack(frames[0][0], body, *frames[2:])


def kv_wrong_message(rng: random.Random, i: int) -> Frames:
    return _frames(rng.choice([_submit(i), P.Cancel(f"fz-{i}", "x"),
                               P.Heartbeat("fuzz", i, 0.0, {})]))


KV_MAKERS: dict[str, Maker] = {"random_bytes": random_bytes, "truncated_handoff":
                               lambda rng, i: [_frames(_handoff(i))[0],
                                               _frames(_handoff(i))[1][:rng.randrange(40)]],
                               "deep_nesting": deep_nesting, "invalid_utf8": invalid_utf8,
                               "kv_tensor_lies": kv_tensor_lies,
                               "kv_wrong_message": kv_wrong_message}


def schedule(makers: dict[str, Maker], count: int, seed: int) -> Iterator[tuple[str, Frames]]:
    rng = random.Random(seed)
    names = sorted(makers)
    for i in range(count):
        name = names[i % len(names)]
        yield name, makers[name](rng, i)


# ---- the harness

class Fuzzer:
    """Sends in bursts and counts the answers (an Error per message is the contract)."""

    def __init__(self, endpoint: str, burst: int = 250) -> None:
        self.ctx = zmq.Context()
        self.sock = make_socket(self.ctx, "DEALER", connect=endpoint, hwm=0)
        self.burst = burst
        self.sent: Counter[str] = Counter()
        self.answered: Counter[str] = Counter()  # Error replies
        self.other: Counter[str] = Counter()  # anything else (must stay empty)

    def run(self, messages: Iterator[tuple[str, Frames]]) -> None:
        batch: list[str] = []
        for name, frames in messages:
            self.sock.send_multipart(frames)
            self.sent[name] += 1
            batch.append(name)
            if len(batch) >= self.burst:
                self._collect(batch)
                batch = []
        self._collect(batch)

    def _collect(self, batch: list[str]) -> None:
        """Replies come back in order on one DEALER pipe: the i-th answers the i-th send."""
        deadline = time.monotonic() + 20
        for name in batch:
            if not self.sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                return  # missing answers show up as sent != answered
            reply = P.decode(self.sock.recv_multipart())
            (self.answered if isinstance(reply, P.Error) else self.other)[name] += 1

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


class GoodClient(threading.Thread):
    """A well-formed client that keeps checking answers while the fuzzing runs."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(daemon=True)
        self.endpoint, self.stop, self.ok, self.errors = endpoint, threading.Event(), 0, []

    def run(self) -> None:
        rng = random.Random(7)
        with Client(self.endpoint, default_timeout_s=20) as client:
            while not self.stop.is_set():
                prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 20))]
                try:
                    out = client.generate(prompt_ids=prompt, max_new_tokens=8)
                    assert list(out.tokens) == null_tokens(prompt, 8, VOCAB)
                    self.ok += 1
                except Exception as exc:  # noqa: BLE001 - collected, the test fails on any
                    self.errors.append(repr(exc))


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def run_fuzz(mesh: LocalMesh, num_client: int, num_kv: int) -> dict[str, object]:
    assert mesh.coordinator is not None
    coordinator_pid = mesh.coordinator.pid
    with Client(mesh.client_endpoint) as probe:
        workers = probe.stats().stats["workers"]
    kv_endpoint = next(w["kv_endpoint"] for w in workers if w["role"] == "decoder")
    good = GoodClient(mesh.client_endpoint)
    good.start()
    client_fuzz, kv_fuzz = Fuzzer(mesh.client_endpoint), Fuzzer(kv_endpoint)
    try:
        client_fuzz.run(schedule(CLIENT_MAKERS, 500, seed=1))  # warm-up: allocator, logs
        rss_before = _rss(coordinator_pid)
        t0 = time.monotonic()
        client_fuzz.run(schedule(CLIENT_MAKERS, num_client, seed=2))
        client_fuzz.run(schedule(RARE_MAKERS, 24, seed=3))
        kv_fuzz.run(schedule(KV_MAKERS, num_kv, seed=4))
        elapsed = time.monotonic() - t0
        rss_after = _rss(coordinator_pid)
    finally:
        good.stop.set()
        good.join(timeout=30)
        client_fuzz.close()
        kv_fuzz.close()
    return {"client": client_fuzz, "kv": kv_fuzz, "good": good, "rss_before": rss_before,
            "rss_after": rss_after, "elapsed": elapsed, "mesh": mesh}


def check_outcome(out: dict[str, object]) -> None:
    mesh = out["mesh"]
    assert isinstance(mesh, LocalMesh)
    assert all(c.poll() is None for c in mesh.children), "a process died under fuzzing"
    for port in ("client", "kv"):
        fuzz = out[port]
        assert isinstance(fuzz, Fuzzer)
        assert not fuzz.other, f"{port}: non-Error answers to malformed input {fuzz.other}"
        assert fuzz.answered == fuzz.sent, f"{port}: unanswered {fuzz.sent - fuzz.answered}"
    good = out["good"]
    assert isinstance(good, GoodClient)
    assert not good.errors and good.ok >= 5, (good.ok, good.errors[:3])
    log = (mesh.spec.run_dir / "coordinator.jsonl").read_text()
    logged = log.count('"bad_client_message"')
    assert logged < sum(out["client"].sent.values()) / 5, f"{logged} log lines: a disk flood"  # type: ignore[attr-defined]
    decoder_log = (mesh.spec.run_dir / "decoder-dec0.jsonl").read_text()
    kv_logged = decoder_log.count('"bad_kv_message"')  # 20 per 10 s window, then summaries
    windows = 2 + float(out["elapsed"]) / 10  # type: ignore[arg-type]
    assert kv_logged <= 20 * windows, f"{kv_logged} bad_kv_message lines: a disk flood"
    growth = int(out["rss_after"]) - int(out["rss_before"])  # type: ignore[call-overload]
    assert growth < 64 << 20, f"coordinator RSS grew by {growth >> 20} MiB"
    client, kv = out["client"], out["kv"]
    assert isinstance(client, Fuzzer) and isinstance(kv, Fuzzer)
    print(f"\nFUZZ client_sent={sum(client.sent.values())} client_errors="
          f"{sum(client.answered.values())} kv_sent={sum(kv.sent.values())} kv_errors="
          f"{sum(kv.answered.values())} good_ok={good.ok} logged={logged} rss_before_mib="
          f"{int(out['rss_before']) / 2**20:.1f} rss_after_mib="  # type: ignore[call-overload]
          f"{int(out['rss_after']) / 2**20:.1f} seconds={out['elapsed']:.1f}")  # type: ignore[call-overload]


def _mesh(tmp_path: os.PathLike[str]) -> LocalMesh:
    spec = LaunchSpec(groups=(WorkerGroup("encoder", 1), WorkerGroup("decoder", 1)),
                      runs_path=tmp_path, transport="ipc", decode_cost_ms=1.0)  # type: ignore[arg-type]
    return LocalMesh(spec)


def test_fuzz_client_and_kv_ports(tmp_path: os.PathLike[str]) -> None:
    with _mesh(tmp_path) as mesh:
        check_outcome(run_fuzz(mesh, num_client=10_000, num_kv=3_000))


@pytest.mark.slow
def test_fuzz_client_and_kv_ports_long(tmp_path: os.PathLike[str]) -> None:
    with _mesh(tmp_path) as mesh:
        check_outcome(run_fuzz(mesh, num_client=100_000, num_kv=30_000))
