"""Protocol values shared by several messages (Sampling, Lifecycle) and the field checks
every message module uses; split from common/protocol.py, which re-exports all of it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from common.protocol_codec import Struct

ROLES = ("encoder", "decoder", "pipeline", "any")
"""Worker roles; "any" = a worker that takes whatever role the coordinator assigns."""
FINISH_REASONS = ("stop", "length", "cancelled", "timeout", "error")
MAX_ID_LEN = 256


def _check_id(name: str, value: str) -> None:
    if not value or len(value) > MAX_ID_LEN:
        raise ValueError(f"{name} must be a non-empty string of at most {MAX_ID_LEN} chars")


def _check_tokens(name: str, ids: tuple[int, ...]) -> None:
    if any(t < 0 for t in ids):
        raise ValueError(f"{name} must hold non-negative token ids")


def _check_range(name: str, rng: tuple[int, ...] | None) -> None:
    if rng is not None and (len(rng) != 2 or not 0 <= rng[0] <= rng[1]):
        raise ValueError(f"{name} must be (first, end) with 0 <= first <= end, got {rng!r}")


@dataclass(frozen=True)
class Sampling(Struct):
    """Sampling parameters as they travel; temperature 0 means greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # run to max_new_tokens (benchmarks force output lengths)

    def check(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_tokens("stop_token_ids", self.stop_token_ids)


@dataclass(frozen=True)
class Lifecycle(Struct):
    """A request's timestamps (time.time() seconds; None until reached): the one source for
    latency checks, simulator validation and traces."""

    t_arrival: float | None = None
    t_queued: float | None = None
    t_encode_start: float | None = None
    t_encode_end: float | None = None
    t_kv_sent: float | None = None
    t_kv_received: float | None = None
    t_first_token: float | None = None
    t_tokens: tuple[float, ...] = ()
    t_finish: float | None = None

    def with_(self, **changes: object) -> Lifecycle:
        return dataclasses.replace(self, **changes)

    def merged(self, other: Lifecycle) -> Lifecycle:
        """Fill our unset timestamps from `other` (e.g. a worker's report)."""
        changes = {
            f.name: getattr(other, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) in (None, ()) and getattr(other, f.name) not in (None, ())
        }
        return dataclasses.replace(self, **changes) if changes else self

    @property
    def ttft(self) -> float | None:
        """Time to first token, from arrival."""
        if self.t_arrival is None or self.t_first_token is None:
            return None
        return self.t_first_token - self.t_arrival

    @property
    def latency(self) -> float | None:
        if self.t_arrival is None or self.t_finish is None:
            return None
        return self.t_finish - self.t_arrival

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if len(self.t_tokens) < 2:
            return None
        return (self.t_tokens[-1] - self.t_tokens[0]) / (len(self.t_tokens) - 1)
