"""Run `exegpt serve` for a plan as a child process and know when it serves (for `exegpt up`).

Why a child process and not serve's functions in this process: `exegpt serve` owns signal
handling (its SignalWatch must live in a main thread) and supervises the whole mesh; `up --demo`
needs its own main thread for the SDK at the same time. The contract with serve is its
command line (read from its own parser, so `up` follows whatever flags serve has) and the
client endpoint, which `up` picks and passes, so readiness is "serve printed that endpoint".
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXEGPT = (sys.executable, "-m", "coordinator.cli")


def serve_flags() -> set[str]:
    """The option strings `exegpt serve` accepts in this build."""
    from coordinator.commands import serve

    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {opt for action in sub.choices["serve"]._actions for opt in action.option_strings}


def free_tcp_endpoint(host: str = "127.0.0.1") -> str:
    """A currently free port on ``host`` (the kernel's choice), as a tcp:// endpoint."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return f"tcp://{host}:{sock.getsockname()[1]}"


def serve_argv(plan: Any, plan_path: Path, *, model_path: str | None, endpoint: str,
               runs_dir: Path, null_model: bool, flags: set[str] | None = None) -> list[str]:
    """`exegpt serve` arguments that run ``plan``.

    With a serve that takes ``--plan`` the plan file is the whole contract. Without it (a build
    where only the null model serves), the plan's encoder/decoder groups become
    ``--encoders/--decoders/--encoder-tp/--decoder-tp`` and B_E the encode batch.
    """
    flags = serve_flags() if flags is None else flags
    argv = [*EXEGPT, "serve", "--transport", "tcp", "--endpoint", endpoint,
            "--runs-dir", str(runs_dir)]
    if null_model:
        argv.append("--null-model")
    if "--plan" in flags:
        argv += ["--plan", str(plan_path)]
        if model_path and "--model" in flags:
            argv += ["--model", model_path]
        return argv
    if not null_model:
        raise ValueError("this build's `exegpt serve` cannot run a plan with a real model yet "
                         "(it has no --plan option); run `exegpt up --null-model` to try the "
                         "mesh with the null model")
    return argv + _group_flags(plan)


def _group_flags(plan: Any) -> list[str]:
    """A plan's groups as serve's per-role flags (null model only: no layer ranges)."""
    by_role: dict[str, list[Any]] = {"encoder": [], "decoder": []}
    for group in plan.worker_groups:
        if group.role == "pipeline":  # RRA stages encode and decode: one of each per stage
            by_role["encoder"].append(group)
            by_role["decoder"].append(group)
        else:
            by_role[group.role].append(group)
    enc, dec = by_role["encoder"], by_role["decoder"]
    return ["--encoders", str(len(enc)), "--decoders", str(len(dec)),
            "--encoder-tp", str(max(g.tp_size for g in enc)),
            "--decoder-tp", str(max(g.tp_size for g in dec)),
            "--encode-batch", str(plan.B_E)]


class ServeProcess:
    """One `exegpt serve` child; ``start()`` returns once it prints its client endpoint."""

    def __init__(self, argv: list[str], endpoint: str, *,
                 echo: Callable[[str], None] = print) -> None:
        self.argv, self.endpoint, self.echo = argv, endpoint, echo
        self.proc: subprocess.Popen[str] | None = None
        self._pump: threading.Thread | None = None
        self._serving = threading.Event()
        self._ready = False

    def start(self, timeout_s: float) -> None:
        """Raises RuntimeError (with serve's exit code; its stderr went to ours) on failure."""
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, text=True, bufsize=1,
                                     start_new_session=True)
        self._pump = threading.Thread(target=self._echo_lines, daemon=True)
        self._pump.start()
        if not self._serving.wait(timeout_s):
            code = self.proc.poll()
            if code is None:
                self.stop()
                raise RuntimeError(f"exegpt serve did not start within {timeout_s:g} s")
        if not self._ready:
            code = self.proc.wait()
            raise RuntimeError(f"exegpt serve exited with code {code} before serving "
                               "(its error is above)")

    def _echo_lines(self) -> None:
        """Echo serve's stdout; flag readiness on the line naming the endpoint (or on EOF)."""
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.echo(line.rstrip("\n"))
            if self.endpoint in line and not self._ready:
                self._ready = True
                self._serving.set()
        self._serving.set()  # EOF: serve exited; start() reports how

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (serve drains and stops its mesh in order), then SIGKILL of its group."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._pump is not None:
            self._pump.join(timeout=2.0)
        return self.proc.returncode
