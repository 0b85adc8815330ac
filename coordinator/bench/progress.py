"""Progress for the whole evaluation (rich): one bar over every step (bound baseline runs,
bound x policy runs, the reference) and one over the requests of the run in progress.
``Progress(enabled=False)`` keeps the counting and prints nothing (tests, --json)."""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.completed = 0
        self.total = 0
        self._bar: Any = None
        self._overall: Any = None
        self._current: Any = None

    def __enter__(self) -> Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TimeElapsedColumn(),
                                     console=Console(file=sys.stderr))
            self._bar.start()
            self._overall = self._bar.add_task("exegpt bench", total=None)
            self._current = self._bar.add_task("", total=None, visible=False)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def say(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(f"exegpt bench: {text}")
        elif self.enabled:
            print(f"exegpt bench: {text}", file=sys.stderr, flush=True)

    def set_total(self, total: int) -> None:
        self.total = total
        if self._bar is not None:
            self._bar.update(self._overall, total=total)

    def step(self) -> None:
        self.completed += 1
        if self._bar is not None:
            self._bar.update(self._overall, completed=self.completed)

    def start_run(self, label: str, num_requests: int) -> None:
        if self._bar is not None:
            self._bar.reset(self._current, total=num_requests or None, visible=True,
                            description=f"  {label}")

    def request_done(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._current)
