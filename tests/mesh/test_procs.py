"""Launch and supervision helpers with plain python children (no mesh)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from common.procs import (
    ChildSpec,
    SignalWatch,
    StartupError,
    StatusPipe,
    start_child,
    terminate_all,
    wait_for_ready,
)

PY = sys.executable


def _py(name: str, code: str, **kw: object) -> ChildSpec:
    return ChildSpec(name, (PY, "-c", textwrap.dedent(code)), **kw)  # type: ignore[arg-type]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_child_dying_during_startup_fails_fast_with_its_stderr(tmp_path: Path) -> None:
    status = StatusPipe()
    slow = start_child(_py("slow", "import time; time.sleep(30)"), tmp_path)
    bad = start_child(_py("bad", "import sys; sys.exit('decoder: cannot bind tcp://x:1')"),
                      tmp_path, process_group=slow.pid)
    t0 = time.monotonic()
    with pytest.raises(StartupError, match="cannot bind tcp://x:1") as err:
        wait_for_ready([slow, bad], status, None, timeout_s=30)
    assert time.monotonic() - t0 < 5
    assert "bad (pid" in str(err.value) and "exit code 1" in str(err.value)
    assert terminate_all([slow, bad], grace_s=5) == []
    status.close()


def test_ready_event_arrives_over_the_status_pipe(tmp_path: Path) -> None:
    status = StatusPipe()
    code = f"""
        from common.procs import write_status
        write_status({status.write_fd}, "bound", worker_endpoint="ipc:///x")
        write_status({status.write_fd}, "ready", client_endpoint="tcp://h:1")
        import time; time.sleep(30)
    """
    child = start_child(_py("coord", code, pass_fds=(status.write_fd,)), tmp_path)
    status.close_writer()
    seen: list[object] = []
    event = wait_for_ready([child], status, None, 30, lambda e: seen.append(e["event"]))
    assert event["client_endpoint"] == "tcp://h:1" and seen == ["bound", "ready"]
    terminate_all([child], 5)
    status.close()


def test_startup_timeout_names_the_log_directory(tmp_path: Path) -> None:
    status = StatusPipe()
    child = start_child(_py("quiet", "import time; time.sleep(30)"), tmp_path)
    with pytest.raises(StartupError, match=str(tmp_path)):
        wait_for_ready([child], status, None, timeout_s=0.3)
    terminate_all([child], 5)
    status.close()


def test_a_signal_interrupts_the_startup_wait(tmp_path: Path) -> None:
    status = StatusPipe()
    child = start_child(_py("quiet", "import time; time.sleep(30)"), tmp_path)
    watch = SignalWatch((signal.SIGUSR1,))
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        with pytest.raises(StartupError, match="signal"):
            wait_for_ready([child], status, watch, timeout_s=10)
    finally:
        watch.close()
        terminate_all([child], 5)
        status.close()


def test_terminate_all_kills_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    code = """
        import signal, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("armed", flush=True)
        time.sleep(30)
    """
    child = start_child(_py("stubborn", code), tmp_path)
    deadline = time.monotonic() + 10
    while "armed" not in child.stderr_tail() and time.monotonic() < deadline:
        time.sleep(0.02)  # (its stdout goes to the same file as stderr)
    assert terminate_all([child], grace_s=0.5) == ["stubborn"]
    assert child.poll() == -signal.SIGKILL


def test_children_die_with_a_sigkilled_launcher(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: no orphans even when the launcher cannot clean up."""
    launcher = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from common.procs import ChildSpec, start_child
        c = start_child(ChildSpec("kid", ({PY!r}, "-c", "import time; time.sleep(60)")),
                        Path({str(tmp_path)!r}))
        print(c.pid, flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([PY, "-c", launcher], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    assert proc.stdout is not None
    kid = int(proc.stdout.readline())
    assert not _gone(kid)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 5
    while not _gone(kid) and time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            os.waitpid(kid, os.WNOHANG)  # not our child: only the reaper may reap it
        except ChildProcessError:
            pass
    assert _gone(kid) or _zombie(kid)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True
