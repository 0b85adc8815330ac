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
               runs_dir: Path, null_model: bool, dtype: str = "bfloat16",
               flags: set[str] | None = None) -> list[str]:
    """`exegpt serve` arguments that run ``plan``.

    With a serve that takes ``--plan`` the plan file is the whole contract. Without it, the
    plan's encoder/decoder groups become ``--encoders/--decoders/--encoder-tp/--decoder-tp``
    and B_E the encode batch: exact for a plan with one group per role (every worker holds
    all layers); the null model (no layers to split) also accepts any other plan, one encoder
    and one decoder per group or pipeline stage, for trying the mesh.
    """
    flags = serve_flags() if flags is None else flags
    argv = [*EXEGPT, "serve", "--transport", "tcp", "--endpoint", endpoint,
            "--runs-dir", str(runs_dir)]
    real = [] if null_model else _real_model_flags(model_path, dtype, flags)
    argv += ["--null-model"] if null_model else real
    if "--plan" in flags:
        return argv + ["--plan", str(plan_path)]
    if not null_model:
        _check_expressible(plan)
    return argv + _group_flags(plan)


def _real_model_flags(model_path: str | None, dtype: str, flags: set[str]) -> list[str]:
    if "--model" not in flags and "--plan" not in flags:
        raise ValueError("this build's `exegpt serve` cannot run a real model yet (no --model "
                         "or --plan option); run `exegpt up --null-model` to try the mesh")
    if "--model" not in flags:
        return []
    if model_path is None:
        raise ValueError("serving a real model needs its files: pass --model PATH (a .gguf "
                         "file or a Hugging Face directory), or --null-model")
    return ["--model", model_path] + (["--dtype", dtype] if "--dtype" in flags else [])


def _check_expressible(plan: Any) -> None:
    """Without --plan, serve's flags hold one encoder group and one decoder group, each with
    every layer: refuse (with what to do) a plan that needs more."""
    roles = [g.role for g in plan.worker_groups]
    if sorted(roles) != ["decoder", "encoder"]:
        shape = ", ".join(f"{g.role} layers {g.layer_range[0]}-{g.layer_range[1]} tp{g.tp_size}"
                          for g in plan.worker_groups)
        raise ValueError(
            f"the plan is {plan.policy} with groups [{shape}], but this build's `exegpt serve` "
            "runs a real model only as one encoder group plus one decoder group (it has no "
            "--plan option yet). Ask for such a plan (`--policy waa` with a bound it meets, "
            "e.g. --latency-bound 60 on 2 workers) or try the plan with --null-model")


def _group_flags(plan: Any) -> list[str]:
    """A plan's groups as serve's per-role flags (a pipeline stage: one encoder + one decoder)."""
    by_role: dict[str, list[Any]] = {"encoder": [], "decoder": []}
    for group in plan.worker_groups:
        if group.role == "pipeline":
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
