"""Rate-limited warnings for per-message events on hot paths.

Why: a hostile or broken peer can send thousands of bad messages a second; one log line each
would fill the disk. Each event name gets ``burst`` lines per ``window_s``; the rest are only
counted, and one ``log_suppressed`` line per event (its name, how many were skipped, the last
one's fields) reports them when the window ends: at the event's next line or at ``flush()``,
which the owner's periodic tick calls so a flood that stops is still reported.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

DEFAULT_BURST = 20
DEFAULT_WINDOW_S = 10.0


@dataclass
class _Window:
    start: float
    used: int = 0
    skipped: int = 0
    last: dict[str, Any] = field(default_factory=dict)


class LogLimiter:
    """``limiter.warning("bad_kv_message", error=...)`` instead of ``log.warning(...)``."""

    def __init__(self, log: Any, burst: int = DEFAULT_BURST,
                 window_s: float = DEFAULT_WINDOW_S) -> None:
        if burst < 1 or window_s <= 0:
            raise ValueError("LogLimiter needs burst >= 1 and window_s > 0")
        self.log, self.burst, self.window_s = log, burst, window_s
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()  # a worker's I/O and compute threads share one
        self.suppressed = 0  # lines skipped since start, all events

    def warning(self, event: str, **fields: Any) -> None:
        self._emit("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit("error", event, fields)

    def _emit(self, level: str, event: str, fields: dict[str, Any]) -> None:
        with self._lock:
            self._emit_locked(level, event, fields)

    def _emit_locked(self, level: str, event: str, fields: dict[str, Any]) -> None:
        now = time.monotonic()
        window = self._windows.get(event)
        if window is None or now - window.start >= self.window_s:
            if window is not None:
                self._summarise(event, window)
            window = self._windows[event] = _Window(start=now)
        if window.used < self.burst:
            window.used += 1
            getattr(self.log, level)(event, **fields)
            return
        window.skipped += 1
        window.last = fields
        self.suppressed += 1

    def flush(self) -> None:
        """Report (and close) every window that has ended; call it from a periodic tick."""
        now = time.monotonic()
        with self._lock:
            for event, window in list(self._windows.items()):
                if now - window.start >= self.window_s:
                    self._summarise(event, window)
                    del self._windows[event]

    def _summarise(self, event: str, window: _Window) -> None:
        if window.skipped:
            self.log.warning("log_suppressed", suppressed_event=event, count=window.skipped,
                             window_s=self.window_s, last=window.last)
