"""Per-process JSON logs and `exegpt logs` merging/filtering/following them."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import structlog

from common.logs import (
    ENV_RUN_ID,
    LogFilter,
    follow_events,
    format_event,
    latest_run,
    merged_events,
    setup_logging,
)
from coordinator.cli import main as cli_main

PROCESS = textwrap.dedent(
    """
    import sys, time, logging, structlog
    from common.logs import setup_logging
    role, wid, rank = sys.argv[1], sys.argv[2] or None, int(sys.argv[3])
    setup_logging(role, wid, tp_rank=rank, runs_path=sys.argv[4], level="debug")
    log = structlog.get_logger()
    for i in range(5):
        log.info("step", i=i, req_id=f"r{i % 2}")
        time.sleep(0.01)
    log.debug("quiet")
    logging.getLogger("asyncio").warning("from stdlib")
    try:
        1 / 0
    except ZeroDivisionError:
        log.exception("boom", req_id="r1")
    """
)


@pytest.fixture
def run_with_three_processes(tmp_path: Path) -> Path:
    env = {**os.environ, ENV_RUN_ID: "run-a"}
    procs = [
        subprocess.Popen([sys.executable, "-c", PROCESS, role, wid, rank, str(tmp_path)],
                         env=env, stderr=subprocess.PIPE, text=True)
        for role, wid, rank in [("coordinator", "", "0"), ("encoder", "enc-0", "0"),
                                ("decoder", "dec-0", "1")]
    ]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert "step" in err and " | " in err  # human-readable console lines on stderr
    return tmp_path / "run-a"


def test_one_json_file_per_process_with_the_agreed_keys(run_with_three_processes: Path) -> None:
    files = sorted(p.name for p in run_with_three_processes.iterdir())
    assert files == ["coordinator.jsonl", "decoder-dec-0.jsonl", "encoder-enc-0.jsonl"]
    lines = (run_with_three_processes / "decoder-dec-0.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert list(first)[:7] == ["timestamp", "level", "role", "worker_id", "tp_rank", "pid",
                               "event"]
    assert first["role"] == "decoder" and first["worker_id"] == "dec-0" and first["tp_rank"] == 1
    assert first["req_id"] == "r0" and first["i"] == 0 and first["timestamp"].endswith("Z")
    events = [json.loads(x) for x in lines]
    assert any(e["event"] == "from stdlib" and e["level"] == "warning" for e in events)
    boom = next(e for e in events if e["event"] == "boom")
    assert "ZeroDivisionError" in boom["exception"] and boom["level"] == "error"


def test_merge_is_in_time_order_and_filters_work(run_with_three_processes: Path) -> None:
    events = list(merged_events(run_with_three_processes, LogFilter()))
    assert len(events) == 3 * 8
    stamps = [e["timestamp"] for e in events]
    assert stamps == sorted(stamps)
    only = list(merged_events(run_with_three_processes, LogFilter(roles=("encoder",))))
    assert {e["role"] for e in only} == {"encoder"} and len(only) == 8
    req = list(merged_events(run_with_three_processes, LogFilter(req_id="r1")))
    assert len(req) == 3 * 3 and all(e["req_id"] == "r1" for e in req)
    errors = list(merged_events(run_with_three_processes, LogFilter(level="warning")))
    assert {e["level"] for e in errors} == {"warning", "error"} and len(errors) == 6
    worker = list(merged_events(run_with_three_processes, LogFilter(workers=("dec-0",))))
    assert {e["worker_id"] for e in worker} == {"dec-0"}


def test_cli_prints_the_latest_run(run_with_three_processes: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    root = str(run_with_three_processes.parent)
    assert cli_main(["logs", "--runs-dir", root, "--role", "decoder", "--level", "info"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[2] == "decoder-dec-0/tp1" and "step i=0 req_id=r0" in out[0]
    assert cli_main(["logs", "--runs-dir", root, "--run", "run-a", "--json", "--req", "r0"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 9 and {x["req_id"] for x in lines} == {"r0"}
    assert cli_main(["logs", "--runs-dir", root, "--run", "nope"]) == 2
    assert "not found" in capsys.readouterr().err


def test_latest_run_and_missing_runs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no runs"):
        latest_run(tmp_path)
    (tmp_path / "a").mkdir()
    time.sleep(0.01)
    (tmp_path / "b").mkdir()
    os.utime(tmp_path / "a", (time.time() + 5, time.time() + 5))
    assert latest_run(tmp_path).name == "a"


def test_follow_sees_new_lines_and_new_processes(tmp_path: Path) -> None:
    run = tmp_path / "r"
    run.mkdir()
    (run / "encoder-e.jsonl").write_text(_line("2026-01-01T00:00:01Z", "encoder", "old"))
    seen: list[dict] = []
    done = threading.Event()

    def writer() -> None:
        time.sleep(0.15)
        with (run / "decoder-d.jsonl").open("a") as f:
            f.write(_line("2026-01-01T00:00:03Z", "decoder", "new"))
            f.write('{"timestamp": "2026-01-01T00:00:04Z", "event": "tor')  # torn line
            f.flush()
            time.sleep(0.15)
            f.write('n"}\n')
        time.sleep(0.15)
        done.set()

    threading.Thread(target=writer).start()
    for event in follow_events(run, LogFilter(), poll_s=0.02, stop=done.is_set):
        seen.append(event)
    assert [e["event"] for e in seen] == ["old", "new", "torn"]


def _line(ts: str, role: str, event: str) -> str:
    return json.dumps({"timestamp": ts, "level": "info", "role": role, "event": event}) + "\n"


def test_console_modes_and_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_RUN_ID, raising=False)  # setup_logging exports the run id
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    stream = io.StringIO()
    setup = setup_logging("coordinator", run_id="x", runs_path=tmp_path, console="json",
                          stream=stream)
    structlog.get_logger().info("hello", n=1)
    assert json.loads(stream.getvalue())["event"] == "hello"
    assert json.loads(setup.path.read_text())["n"] == 1
    with pytest.raises(ValueError, match="log level"):
        setup_logging("coordinator", run_id="x", runs_path=tmp_path, level="loud")
    with pytest.raises(ValueError, match="console"):
        setup_logging("coordinator", run_id="x", runs_path=tmp_path, console="fancy")
    structlog.reset_defaults()


def test_format_event_is_readable() -> None:
    text = format_event({"timestamp": "2026-01-01T10:11:12.345678Z", "level": "info",
                         "role": "encoder", "worker_id": "e0", "tp_rank": 0, "pid": 1,
                         "event": "encoded", "req_id": "r1", "tokens": 5})
    assert text == "10:11:12.345 info    encoder-e0 | encoded req_id=r1 tokens=5"
