"""Worker processes on the coordinator's own host: notice their exit at once (a pidfd each).

Why: a SIGKILLed worker says nothing; without this the coordinator learns of it only at the
heartbeat deadline (5 s by default), and a TP group with one dead rank stalls that long. A
worker's Hello names its ``pid`` and ``host``; when the host is ours and the process is a
worker (its command line names ``encoder_worker`` / ``decoder_worker``: guarding against a pid
of another pid namespace that merely shares the host name), the coordinator opens a pidfd
(readable when the process exits) and watches it on its asyncio loop. The callback then
drops the worker (and its TP group) exactly as a missed deadline would.

Remote workers (another host, a container) are not watched: for those the worker's own
goodbye (common/workerlink.py) and the heartbeat deadline remain.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

WORKER_MODULES = (b"encoder_worker", b"decoder_worker")


def is_local_worker(pid: int, host: str) -> bool:
    """True when ``pid`` is a worker process of this host (and not this process)."""
    if pid <= 0 or pid == os.getpid() or host != socket.gethostname():
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return any(name in cmdline for name in WORKER_MODULES)


class ExitWatch:
    """One pidfd per watched worker id; ``on_exit(worker_id, pid)`` runs on the loop."""

    def __init__(self, on_exit: Callable[[str, int], None], log: Any) -> None:
        self.on_exit = on_exit
        self.log = log
        self._fds: dict[str, tuple[int, int]] = {}  # worker id -> (pid, pidfd)

    def watch(self, worker_id: str, pid: int, host: str) -> bool:
        """Watch ``pid`` for ``worker_id`` (replacing an older pid); False if not possible."""
        if self._fds.get(worker_id, (0, -1))[0] == pid:
            return True
        self.forget(worker_id)
        if not hasattr(os, "pidfd_open") or not is_local_worker(pid, host):
            return False
        try:
            loop = asyncio.get_running_loop()
            fd = os.pidfd_open(pid)
        except (RuntimeError, OSError):  # no loop (unit tests) / the process is gone already
            return False
        self._fds[worker_id] = (pid, fd)
        loop.add_reader(fd, self._exited, worker_id, pid)
        return True

    def forget(self, worker_id: str) -> None:
        entry = self._fds.pop(worker_id, None)
        if entry is None:
            return
        try:
            asyncio.get_running_loop().remove_reader(entry[1])
        except RuntimeError:
            pass
        os.close(entry[1])

    def close(self) -> None:
        for worker_id in list(self._fds):
            self.forget(worker_id)

    def _exited(self, worker_id: str, pid: int) -> None:
        self.forget(worker_id)
        self.log.warning("worker_process_exited", worker=worker_id, worker_pid=pid)
        self.on_exit(worker_id, pid)
