"""Fault injection for tests and soaks: ``EXEGPT_FAULTS`` (read once, when a worker starts).

    EXEGPT_FAULTS="kv_drop=0.2,kv_delay=0.3,kv_delay_ms=1500,seed=7"

- ``kv_drop``: probability that an encoder silently drops a KV handoff (the decoder never
  hears of the request; the coordinator's ``--kv-timeout`` re-runs it).
- ``kv_delay`` / ``kv_delay_ms``: probability that a handoff is held back, and for how long
  (the I/O thread keeps serving meanwhile; a delay past ``--kv-timeout`` makes the handoff
  stale: the request was re-run under a new wire id and the decoder is told to drop it).
- ``seed``: the random stream (default: random), so a test run is repeatable.

Unset or empty: no faults (the default). A malformed value stops the worker at startup with
the reason. Why an environment variable: it reaches every worker of a mesh through the
launcher unchanged, without a flag that production configurations would carry.
"""

from __future__ import annotations

import heapq
import itertools
import os
import random
from dataclasses import dataclass
from typing import Any

ENV_FAULTS = "EXEGPT_FAULTS"
_KEYS = ("kv_drop", "kv_delay", "kv_delay_ms", "seed")


@dataclass(frozen=True)
class Faults:
    kv_drop: float = 0.0
    kv_delay: float = 0.0
    kv_delay_ms: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("kv_drop", "kv_delay"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{ENV_FAULTS}: {name} is a probability in [0, 1], got "
                                 f"{getattr(self, name)}")
        if self.kv_drop + self.kv_delay > 1.0:
            raise ValueError(f"{ENV_FAULTS}: kv_drop + kv_delay must be <= 1")
        if self.kv_delay_ms < 0 or (self.kv_delay > 0 and self.kv_delay_ms == 0):
            raise ValueError(f"{ENV_FAULTS}: kv_delay needs kv_delay_ms > 0")

    @property
    def active(self) -> bool:
        return self.kv_drop > 0 or self.kv_delay > 0

    @classmethod
    def parse(cls, text: str) -> Faults:
        """``key=value`` pairs separated by commas (keys: kv_drop, kv_delay, kv_delay_ms,
        seed)."""
        values: dict[str, float | int] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key not in _KEYS:
                raise ValueError(f"{ENV_FAULTS}: expected key=value with a key in {_KEYS}, "
                                 f"got {item!r}")
            try:
                values[key] = int(value) if key == "seed" else float(value)
            except ValueError:
                raise ValueError(f"{ENV_FAULTS}: {key} needs a number, got {value!r}") from None
        return cls(**values)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls) -> Faults:
        return cls.parse(os.environ.get(ENV_FAULTS, ""))


class KVFaults:
    """Decides each KV handoff's fate (None: send now, "drop", or a delay in seconds) and
    holds the delayed ones until they are due."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self._rng = random.Random(faults.seed)
        self.dropped = 0
        self.delayed = 0
        self._held: list[tuple[float, int, str, list[Any]]] = []
        self._order = itertools.count()

    def hold(self, due: float, peer: str, frames: list[Any]) -> None:
        heapq.heappush(self._held, (due, next(self._order), peer, frames))

    def due(self, now: float) -> list[tuple[str, list[Any]]]:
        """The held sends whose time has come, in order."""
        out = []
        while self._held and self._held[0][0] <= now:
            _, _, peer, frames = heapq.heappop(self._held)
            out.append((peer, frames))
        return out

    def fate(self) -> str | float | None:
        if not self.faults.active:
            return None
        roll = self._rng.random()
        if roll < self.faults.kv_drop:
            self.dropped += 1
            return "drop"
        if roll < self.faults.kv_drop + self.faults.kv_delay:
            self.delayed += 1
            return self.faults.kv_delay_ms / 1000
        return None
