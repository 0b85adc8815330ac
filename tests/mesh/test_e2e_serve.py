"""`exegpt serve` as a user runs it: a subprocess, stopped by SIGTERM, failing fast on a crash."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.backend import null_tokens
from common.client import AsyncClient

EXEGPT = [sys.executable, "-m", "coordinator.cli"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def serves() -> Iterator[list[subprocess.Popen[str]]]:
    """Started `exegpt serve` processes; stopped (and their meshes with them) even when a
    test fails, so no mesh outlives the test."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _serve(started: list[subprocess.Popen[str]], tmp_path: Path, *extra: str,
           ) -> subprocess.Popen[str]:
    proc = subprocess.Popen([*EXEGPT, "serve", "--null-model", "--runs-dir", str(tmp_path),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    started.append(proc)
    return proc


def _processes_of(run_id: str) -> list[int]:
    """Live processes started for this run (the launcher gives each child EXEGPT_RUN_ID)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().split()[2]
        except OSError:
            continue
        if f"EXEGPT_RUN_ID={run_id}".encode() in environ and state != "Z":
            pids.append(int(entry.name))
    return pids


def test_sigterm_drains_in_flight_requests_and_leaves_no_process(
        tmp_path: Path, serves: list[subprocess.Popen[str]]) -> None:
    serve = _serve(serves, tmp_path, "--transport", "tcp", "--model-shape", "tiny-llama",
                   "--decode-cost-ms", "5", "--decoders", "2")
    assert serve.stdout is not None
    banner = serve.stdout.readline()
    match = re.search(r"on (tcp://\S+)", banner)
    assert match, banner + (serve.stderr.read() if serve.stderr else "")
    run_id = re.search(r"run (\S+):", serve.stdout.readline()).group(1)  # type: ignore[union-attr]
    assert len(_processes_of(run_id)) == 4  # coordinator, encoder, two decoders

    signalled: list[int] = []

    async def clients() -> list[list[int]]:
        async with AsyncClient(match.group(1), default_timeout_s=30) as client:
            async def one(i: int) -> list[int]:
                tokens: list[int] = []
                async with client.stream(prompt_ids=[i], max_new_tokens=150) as s:
                    async for chunk in s:
                        tokens.extend(chunk.tokens)
                        if not signalled:
                            signalled.append(len(tokens))
                            serve.send_signal(signal.SIGTERM)  # mid-stream
                return tokens
            return await asyncio.gather(*(one(i) for i in range(20)))

    outs = asyncio.run(clients())
    assert signalled and signalled[0] < 150
    assert outs == [null_tokens([i], 150, 256) for i in range(20)]  # drained, not dropped
    assert serve.wait(timeout=30) == 0
    deadline = time.monotonic() + 5
    while _processes_of(run_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_of(run_id) == []
    logs = {p.name for p in (tmp_path / run_id).glob("*.jsonl")}
    assert logs == {"coordinator.jsonl", "encoder-enc0.jsonl", "decoder-dec0.jsonl",
                    "decoder-dec1.jsonl"}


def test_serve_fails_fast_with_the_crashing_workers_error(
        tmp_path: Path, serves: list[subprocess.Popen[str]]) -> None:
    t0 = time.monotonic()
    serve = _serve(serves, tmp_path, "--model-shape", "smollm2-135m", "--decoder-tp", "2")
    _, err = serve.communicate(timeout=60)
    assert serve.returncode == 1
    assert time.monotonic() - t0 < 30
    assert "startup failed" in err and "do not split over tp_size 2" in err
    run_dirs = list(tmp_path.iterdir())
    assert len(run_dirs) == 1 and _processes_of(run_dirs[0].name) == []
    assert os.path.exists(run_dirs[0] / "coordinator.jsonl")
