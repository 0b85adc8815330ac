"""Fault injection on a running LocalMesh: kill and restart the coordinator or a worker group
on the same endpoints (used by the fault tests and by tests/mesh/soak.py).

Why here and not in coordinator.launch: the launcher's job is one ordered start and stop; a
restart in place is a test and soak tool (production restarts come from the supervisor, e.g.
docker-compose ``restart: on-failure``, with fixed endpoints).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from common.procs import Child, ChildSpec, StatusPipe, start_child, wait_for_ready
from coordinator.launch import LocalMesh

_FLAGS_TAKING_ENDPOINTS = ("--client-endpoint", "--worker-endpoint", "--ready-fd")


def kill(child: Child, timeout_s: float = 10.0) -> None:
    """SIGKILL and reap ``child`` (no-op if it already exited)."""
    if child.poll() is None:
        os.kill(child.pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)


def worker_endpoint(mesh: LocalMesh) -> str:
    """The worker endpoint the coordinator bound (its ``bound`` status event)."""
    bound = [e for e in mesh.events if e.get("event") == "bound"]
    return str(bound[-1]["worker_endpoint"])


def coordinator_spec(mesh: LocalMesh, status_fd: int, generation: int) -> ChildSpec:
    """The first coordinator's argv on the endpoints it actually bound (tcp ``:*`` resolved)."""
    first = mesh.spec.coordinator_child(status_fd)
    argv = list(first.argv)
    values = {"--client-endpoint": mesh.client_endpoint,
              "--worker-endpoint": worker_endpoint(mesh), "--ready-fd": str(status_fd)}
    for flag in _FLAGS_TAKING_ENDPOINTS:
        argv[argv.index(flag) + 1] = values[flag]
    return ChildSpec(f"coordinator-{generation}", tuple(argv), env=first.env,
                     pass_fds=(status_fd,))


def restart_coordinator(mesh: LocalMesh, timeout_s: float = 60.0, down_s: float = 0.0) -> float:
    """kill -9 the coordinator, start a new one on the same endpoints (after ``down_s``) and
    wait until it serves again (every worker re-registered). Returns seconds from the kill to
    serving."""
    assert mesh.coordinator is not None
    old = mesh.coordinator
    t0 = time.monotonic()
    kill(old)
    old.close()
    time.sleep(down_s)
    generation = len(list(mesh.spec.run_dir.glob("coordinator*.stderr")))
    if mesh.status is not None:
        mesh.status.close()
    status = mesh.status = StatusPipe()
    child = start_child(coordinator_spec(mesh, status.write_fd, generation), mesh.spec.run_dir)
    status.close_writer()
    mesh.children = [c for c in mesh.children if c is not old] + [child]
    mesh.coordinator = child
    live = [c for c in mesh.children if c.poll() is None]
    wait_for_ready(live, status, None, timeout_s, mesh.events.append)
    return time.monotonic() - t0


def group_of(mesh: LocalMesh, name: str) -> list[Child]:
    """Every rank of the worker group ``name`` belongs to (``decoder-dec0.r1`` -> both ranks)."""
    base = name.split(".r")[0]
    return [c for c in mesh.workers if c.name == base or c.name.startswith(base + ".r")]


def restart_workers(mesh: LocalMesh, children: list[Child]) -> list[Child]:
    """Start the same argv again for each of ``children`` (after they exited): a replacement
    registers under the same worker id."""
    fresh = []
    for old in children:
        kill(old)
        child = start_child(old.spec, mesh.spec.run_dir, process_group=0)
        mesh.children = [c if c is not old else child for c in mesh.children]
        fresh.append(child)
    return fresh


def wait_exit(children: list[Child], timeout_s: float) -> list[int | None]:
    deadline = time.monotonic() + timeout_s
    while any(c.poll() is None for c in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [c.poll() for c in children]


def log_events(run_dir: Path, name: str, event: str) -> list[str]:
    """Lines of ``event`` in the JSON logs of processes whose log file contains ``name``."""
    out = []
    for path in sorted(run_dir.glob(f"*{name}*.jsonl" if name else "*.jsonl")):
        out += [line for line in path.read_text().splitlines() if f'"{event}"' in line]
    return out
