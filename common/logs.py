"""Per-process structured logging: JSON lines in the run directory, readable text on stderr.

Why: a mesh is many processes; finding what happened to one request means merging their logs
in time order, which needs machine-readable lines with the same keys everywhere. Every
process calls `setup_logging(role, worker_id, tp_rank=...)` once at start; afterwards
`structlog.get_logger()` (or `get_logger()`) anywhere writes to

    runs/<run-id>/<role>-<worker_id>.jsonl   one JSON object per line:
        {"timestamp": "2026-...Z", "level": "info", "role": "decoder", "worker_id": "dec-0",
         "tp_rank": 0, "pid": 123, "event": "kv received", "req_id": "...", ...fields}
    stderr                                    "04:12:03.123 info  decoder-dec-0 | kv received ..."

The run id comes from the argument, else EXEGPT_RUN_ID (the launcher sets it for its
children so a whole mesh shares one directory), else a new one. Bind `req_id` with
`structlog.contextvars.bound_contextvars(req_id=...)` or `log.bind(req_id=...)`.
`exegpt logs` (coordinator/commands/logs.py) merges and follows these files.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import structlog

ENV_RUN_ID = "EXEGPT_RUN_ID"
ENV_RUNS_DIR = "EXEGPT_RUNS_DIR"
ENV_LOG_LEVEL = "EXEGPT_LOG_LEVEL"
ENV_LOG_CONSOLE = "EXEGPT_LOG_CONSOLE"  # "text" (default), "json" (containers), "none"
LEVELS = ("debug", "info", "warning", "error", "critical")
_LEVEL_NO = {name: i for i, name in enumerate(LEVELS)}
_FIXED_KEYS = ("timestamp", "level", "role", "worker_id", "tp_rank", "pid", "event")
_COLORS = ("36", "33", "32", "35", "34", "96", "93", "92", "95", "94")
_LEVEL_COLORS = {"debug": "2", "info": "0", "warning": "33", "error": "31;1", "critical": "41;1"}


def runs_dir(path: str | Path | None = None) -> Path:
    return Path(path or os.environ.get(ENV_RUNS_DIR) or "runs")


def new_run_id() -> str:
    """Sortable and unique: UTC time plus a few random hex digits."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


def process_name(role: str, worker_id: str | None) -> str:
    return f"{role}-{worker_id}" if worker_id else role


@dataclass(frozen=True)
class LogSetup:
    run_id: str
    run_dir: Path
    path: Path


class _Sink:
    """Writes each event as one JSON line to the file and (optionally) a line to the console."""

    def __init__(self, file: TextIO, console: str, stream: TextIO) -> None:
        self.file, self.console, self.stream = file, console, stream
        self.color = console == "text" and stream.isatty()
        self.lock = threading.Lock()

    def write(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, default=str, ensure_ascii=False)
        with self.lock:
            self.file.write(line + "\n")
            self.file.flush()
            if self.console == "json":
                self.stream.write(line + "\n")
            elif self.console == "text":
                self.stream.write(format_event(event, color=self.color) + "\n")
            self.stream.flush()


class _FanoutLogger:
    """structlog logger whose every method hands the finished event dict to the sink."""

    def __init__(self, sink: _Sink) -> None:
        self.sink = sink

    def msg(self, **event: Any) -> None:
        self.sink.write(event)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


def setup_logging(
    role: str,
    worker_id: str | None = None,
    *,
    tp_rank: int | None = None,
    run_id: str | None = None,
    runs_path: str | Path | None = None,
    level: str | None = None,
    console: str | None = None,
    stream: TextIO | None = None,
) -> LogSetup:
    """Configure structlog for this process; returns where the JSON lines go."""
    level = (level or os.environ.get(ENV_LOG_LEVEL) or "info").lower()
    console = console or os.environ.get(ENV_LOG_CONSOLE) or "text"
    if level not in _LEVEL_NO:
        raise ValueError(f"log level {level!r} must be one of {LEVELS}")
    if console not in ("text", "json", "none"):
        raise ValueError(f"console mode {console!r} must be text, json or none")
    run_id = run_id or os.environ.get(ENV_RUN_ID) or new_run_id()
    os.environ[ENV_RUN_ID] = run_id  # children started from here join the same run
    directory = runs_dir(runs_path) / run_id
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{process_name(role, worker_id)}.jsonl"
    sink = _Sink(path.open("a", encoding="utf-8"), console, stream or sys.stderr)
    static = {"role": role, "worker_id": worker_id, "tp_rank": tp_rank, "pid": os.getpid()}
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
            lambda _l, _m, ev: {**static, **ev},
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            _order_keys,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=lambda *args: _FanoutLogger(sink),
        cache_logger_on_first_use=False,
    )
    _bridge_stdlib_logging(level)
    return LogSetup(run_id, directory, path)


def _order_keys(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    ordered = {k: event.pop(k) for k in _FIXED_KEYS if k in event}
    ordered.update(event)
    return ordered


class _StdlibBridge(logging.Handler):
    """Sends stdlib logging records (asyncio, libraries) through structlog."""

    def emit(self, record: logging.LogRecord) -> None:
        log = structlog.get_logger().bind(logger=record.name)
        method = getattr(log, record.levelname.lower(), log.info)
        method(record.getMessage(), **({"exc_info": record.exc_info} if record.exc_info else {}))


def _bridge_stdlib_logging(level: str) -> None:
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not isinstance(h, _StdlibBridge)]
    root.addHandler(_StdlibBridge())
    root.setLevel(max(logging.getLevelNamesMapping()[level.upper()], logging.INFO))


def get_logger(**bind: Any) -> Any:
    return structlog.get_logger().bind(**bind)


# ---------------------------------------------------------------- reading and formatting


@dataclass(frozen=True)
class LogFilter:
    roles: tuple[str, ...] = ()
    workers: tuple[str, ...] = ()
    req_id: str | None = None
    level: str = "debug"

    def __post_init__(self) -> None:
        if self.level not in _LEVEL_NO:
            raise ValueError(f"level {self.level!r} must be one of {LEVELS}")

    def accepts(self, event: dict[str, Any]) -> bool:
        if self.roles and event.get("role") not in self.roles:
            return False
        if self.workers and str(event.get("worker_id")) not in self.workers:
            return False
        if self.req_id is not None and event.get("req_id") != self.req_id:
            return False
        return _LEVEL_NO.get(str(event.get("level")), 0) >= _LEVEL_NO[self.level]


def latest_run(root: Path) -> Path:
    runs = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    if not runs:
        raise FileNotFoundError(f"no runs in {root.resolve()} (start a server, or pass --run)")
    return max(runs, key=lambda p: (p.stat().st_mtime, p.name))


def read_events(path: Path) -> Iterator[dict[str, Any]]:
    """Complete JSON lines of one file (a torn or foreign line is skipped, not fatal)."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            event = _parse(line)
            if event is not None:
                yield event


def _parse(line: str) -> dict[str, Any] | None:
    if not line.endswith("\n"):
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None


def merged_events(run: Path, flt: LogFilter) -> Iterator[dict[str, Any]]:
    """All events of a run in time order (each file is already in order: a k-way merge)."""
    streams = [read_events(p) for p in sorted(run.glob("*.jsonl"))]
    merged = heapq.merge(*streams, key=lambda e: str(e.get("timestamp", "")))
    return (e for e in merged if flt.accepts(e))


def follow_events(
    run: Path, flt: LogFilter, *, poll_s: float = 0.2, stop: Callable[[], bool] = lambda: False
) -> Iterator[dict[str, Any]]:
    """Like `docker-compose logs -f`: everything so far, then new lines from every file
    (including files of processes that start later), each poll's batch in time order."""
    offsets: dict[Path, int] = {}
    while True:
        batch = []
        for path in sorted(run.glob("*.jsonl")):
            batch.extend(_new_lines(path, offsets))
        batch.sort(key=lambda e: str(e.get("timestamp", "")))
        yield from (e for e in batch if flt.accepts(e))
        if stop():
            return
        time.sleep(poll_s)


def _new_lines(path: Path, offsets: dict[Path, int]) -> Iterable[dict[str, Any]]:
    with path.open("rb") as f:
        f.seek(offsets.get(path, 0))
        data = f.read()
    end = data.rfind(b"\n") + 1  # keep a torn last line for the next poll
    offsets[path] = offsets.get(path, 0) + end
    events = (_parse(line + "\n") for line in data[:end].decode("utf-8", "replace").splitlines())
    return [e for e in events if e is not None]


def _paint(text: str, code: str, color: bool) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if color else text


def format_event(event: dict[str, Any], *, color: bool = False, width: int = 0) -> str:
    """One human line: time, level, process prefix, event, then key=value fields."""
    name = process_name(str(event.get("role", "?")), event.get("worker_id"))
    if event.get("tp_rank") not in (None, 0):
        name += f"/tp{event['tp_rank']}"
    stamp = str(event.get("timestamp", ""))[11:23]
    level = str(event.get("level", ""))
    fields = " ".join(
        f"{k}={v}" for k, v in event.items() if k not in _FIXED_KEYS and k != "exception"
    )
    prefix = _paint(name.ljust(width), _COLORS[sum(name.encode()) % len(_COLORS)], color)
    text = f"{stamp} {_paint(level.ljust(7), _LEVEL_COLORS.get(level, '0'), color)} {prefix} | "
    text += f"{event.get('event', '')}{' ' + fields if fields else ''}"
    if "exception" in event:
        text += "\n" + str(event["exception"])
    return text
