"""Process launch, startup-handshake wait and supervision for a local mesh.

Who supervises whom::

    launcher (`exegpt serve`)            owns a process group holding every child
      |-- coordinator                    reports startup progress on a pipe (``--ready-fd``)
      |-- encoder worker(s)  \\          talk only to the coordinator (and decoders, for KV);
      `-- decoder worker(s)  /           exit on the coordinator's heartbeat deadline

The launcher never speaks ZeroMQ. It polls, in one ``select.poll``, the coordinator's status
pipe, one ``pidfd`` per child (readable when that child exits) and a signal wake-up pipe. So a
child that dies during startup ends the wait at once with that child's stderr tail instead of a
hang, and SIGINT/SIGTERM interrupt any wait. Children run in their own process group (a Ctrl-C
in the terminal reaches only the launcher, which then shuts them down in order) and carry
``PR_SET_PDEATHSIG`` so that even a SIGKILLed launcher leaves no orphans. (The kernel ties
that signal to the *thread* that started the child: start children from a long-lived thread,
normally the main one.)
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PR_SET_PDEATHSIG = 1
STDERR_TAIL_LINES = 30


class StartupError(RuntimeError):
    """The mesh did not come up: a child died, or the handshake missed its deadline."""


@dataclass(frozen=True)
class ChildSpec:
    """One process to start: a name unique in the run (also its log-file stem) and its argv."""

    name: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    pass_fds: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"child name must be a non-empty file stem, got {self.name!r}")
        if not self.argv:
            raise ValueError(f"child {self.name!r} needs a non-empty argv")


@dataclass
class Child:
    """A started child: its Popen, an exit pidfd for polling and where its stderr goes."""

    spec: ChildSpec
    popen: subprocess.Popen[bytes]
    pidfd: int
    stderr_path: Path
    exited_at: float | None = field(default=None)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        code = self.popen.poll()
        if code is not None and self.exited_at is None:
            self.exited_at = time.monotonic()
        return code

    def stderr_tail(self, lines: int = STDERR_TAIL_LINES) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def describe_exit(self) -> str:
        code = self.poll()
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        tail = self.stderr_tail()
        return f"{self.name} (pid {self.pid}) {how}" + (f"; stderr tail:\n{tail}" if tail else "")

    def close(self) -> None:
        if self.pidfd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = -1


_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """preexec hook: the kernel sends SIGTERM to this child when the launcher dies.

    The libc function is looked up before fork: the child only makes one system call.
    """
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def start_child(spec: ChildSpec, log_dir: Path, process_group: int = 0) -> Child:
    """Start ``spec`` in process group ``process_group`` (0: a new group led by this child)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    stderr_path = log_dir / f"{spec.name}.stderr"
    env = dict(os.environ)
    env.update(dict(spec.env))
    env.setdefault("PYTHONUNBUFFERED", "1")
    with open(stderr_path, "wb") as err:
        popen = subprocess.Popen(
            list(spec.argv), stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env,
            pass_fds=spec.pass_fds, process_group=process_group, preexec_fn=_die_with_parent,
        )
    return Child(spec=spec, popen=popen, pidfd=os.pidfd_open(popen.pid), stderr_path=stderr_path)


class StatusPipe:
    """The coordinator's startup report: JSON lines written to an inherited pipe fd."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self._buffer = b""

    def read_events(self) -> list[dict[str, object]]:
        try:
            chunk = os.read(self.read_fd, 65536)
        except BlockingIOError:
            return []
        if not chunk:
            return [{"event": "closed"}]
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def close_writer(self) -> None:
        """Idempotent: closing an fd number twice would close whatever reused it since."""
        if self.write_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.write_fd)
            self.write_fd = -1

    def close(self) -> None:
        self.close_writer()
        if self.read_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.read_fd)
            self.read_fd = -1


def write_status(fd: int | None, event: str, **fields: object) -> None:
    """Coordinator side of :class:`StatusPipe` (no-op when started without a launcher)."""
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(fd, (json.dumps({"event": event, **fields}) + "\n").encode())


class SignalWatch:
    """SIGINT/SIGTERM turned into a readable fd, so a poll loop wakes up on them."""

    def __init__(self, signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self.read_fd, self._write_fd = os.pipe()
        for fd in (self.read_fd, self._write_fd):
            os.set_blocking(fd, False)
        self.received: list[int] = []
        self._old = {sig: signal.signal(sig, self._on_signal) for sig in signals}
        self._old_wakeup = signal.set_wakeup_fd(self._write_fd)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.received.append(signum)

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.read_fd, 4096)

    def close(self) -> None:
        signal.set_wakeup_fd(self._old_wakeup)
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        for fd in (self.read_fd, self._write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def wait_any(children: Sequence[Child], extra_fds: Sequence[int], timeout_s: float | None,
             ) -> tuple[list[Child], list[int]]:
    """Block until a child exits, an extra fd is readable or the timeout passes."""
    poller = select.poll()
    by_fd = {c.pidfd: c for c in children if c.poll() is None and c.pidfd >= 0}
    for fd in list(by_fd) + list(extra_fds):
        poller.register(fd, select.POLLIN)
    exited = [c for c in children if c.poll() is not None]
    if exited:
        return exited, []
    ms = None if timeout_s is None else max(0, int(timeout_s * 1000))
    ready = [fd for fd, _ in poller.poll(ms)]
    return [by_fd[fd] for fd in ready if fd in by_fd and by_fd[fd].poll() is not None], [
        fd for fd in ready if fd not in by_fd]


def wait_for_ready(children: Sequence[Child], status: StatusPipe, signals: SignalWatch | None,
                   timeout_s: float, on_event: Callable[[dict[str, object]], None] | None = None,
                   until: str = "ready") -> dict[str, object]:
    """Wait for the coordinator's ``until`` event; fail fast on any child exit or signal."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise StartupError(f"the mesh was not ready within {timeout_s:.0f} s; "
                               f"see the logs in {children[0].stderr_path.parent}")
        extra = [status.read_fd] + ([signals.read_fd] if signals is not None else [])
        exited, fds = wait_any(children, extra, left)
        if exited:
            raise StartupError("a process died during startup: " + exited[0].describe_exit())
        if signals is not None and signals.read_fd in fds:
            signals.drain()
            if signals.received:
                raise StartupError(f"interrupted by signal {signals.received[-1]} during startup")
        if status.read_fd in fds:
            for event in status.read_events():
                if on_event is not None:
                    on_event(event)
                if event.get("event") == until:
                    return event
                if event.get("event") == "failed":
                    raise StartupError(f"coordinator: {event.get('error')}")
                if event.get("event") == "closed":
                    raise StartupError("the coordinator closed its status pipe during startup")


def terminate_all(children: Sequence[Child], grace_s: float) -> list[str]:
    """SIGTERM whoever is alive, wait up to ``grace_s``, SIGKILL the rest; returns the killed."""
    for child in children:
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.popen.send_signal(signal.SIGTERM)
    return reap(children, grace_s)


def reap(children: Sequence[Child], grace_s: float) -> list[str]:
    """Wait up to ``grace_s`` for every child; SIGKILL and name the ones still running."""
    deadline = time.monotonic() + grace_s
    while any(c.poll() is None for c in children):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        wait_any(children, [], min(left, 0.2))
    killed = []
    for child in children:
        if child.poll() is None:
            killed.append(child.name)
            with contextlib.suppress(ProcessLookupError):
                child.popen.kill()
            child.popen.wait()
    for child in children:
        child.close()
    return killed
