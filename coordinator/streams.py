"""Pipeline streams: which pass each request group runs next (pure state machines, no I/O).

A pipeline plan (RRA, static, continuous) keeps ``streams`` independent request groups going
through the same stage workers (the simulator's micro-batches in flight: one per stage by
default, so every stage has work while the others compute). Each :class:`Stream` has at most
one pass in flight::

    IDLE --next_pass(queued)--> BUSY --done(finished) / failed()--> IDLE
      ^                                                               |
      +---------------------------------------------------------------+

What the next pass is, by policy (``B`` = the plan's B_E, ``N_D`` its encoding period):

    static      encode up to B queued requests only when the stream's batch is empty, then
                decode until its longest request finishes (no joins mid-batch: FT-style)
    continuous  B slots: whenever slots are free and requests wait, encode up to the free
                slots; otherwise decode everything running (Orca/vLLM iteration level)
    rra         cycles: encode up to B queued requests, then N_D decode passes over the
                stream's running batch; a cycle ends early when the batch empties (the
                simulator's "the stream moves on to its next encode")

These match ``coordinator/planner/simulator.py`` (``_static``, ``_continuous``, ``_rra``).
Requests that leave a stream (finished on the last stage, cancelled, timed out, lost) go into
the ``free`` of the stream's next pass exactly once, so every stage drops their KV; with
nothing else to do a stream still sends a free-only pass (a decode with no requests).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

POLICIES = ("static", "continuous", "rra")


@dataclass(frozen=True)
class StreamKnobs:
    """The plan's knobs for one stream: policy, ``batch`` (B_E) and ``n_d`` (RRA's N_D)."""

    policy: str
    batch: int
    n_d: int = 1

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"stream policy must be one of {POLICIES}, got {self.policy!r}")
        if self.batch < 1:
            raise ValueError(f"stream batch (the plan's B_E) must be >= 1, got {self.batch}")
        if self.n_d < 1:
            raise ValueError(f"N_D (decode passes per RRA cycle) must be >= 1, got {self.n_d}")


@dataclass(frozen=True)
class Pass:
    """The next pass of a stream. Encode: ``req_ids`` are queued requests it admits (in queue
    order); decode: the running requests. ``free``: ids every stage must drop first."""

    kind: str
    req_ids: tuple[str, ...]
    free: tuple[str, ...] = ()

    @property
    def admits(self) -> tuple[str, ...]:
        return self.req_ids if self.kind == "encode" else ()


class Stream:
    """One request group's state: its running batch, pending frees, the pass in flight."""

    def __init__(self, index: int, knobs: StreamKnobs) -> None:
        self.index = index
        self.knobs = knobs
        self.running: dict[str, None] = {}  # insertion-ordered set: the decode order
        self.busy: Pass | None = None
        self._free: dict[str, None] = {}
        self._decodes_left = 0  # rra: decode passes left in the current cycle

    def __repr__(self) -> str:
        return (f"Stream({self.index}, {self.knobs.policy}, running={len(self.running)}, "
                f"busy={self.busy is not None}, free={len(self._free)})")

    @property
    def mid_cycle(self) -> bool:
        """rra: inside a cycle (decode passes left over a non-empty batch); the driver keeps
        other streams from starting their next cycle meanwhile (lock step, as simulated)."""
        return self.knobs.policy == "rra" and self._decodes_left > 0 and bool(self.running)

    @property
    def pending_free(self) -> tuple[str, ...]:
        return tuple(self._free)

    def next_pass(self, queued: Sequence[str]) -> Pass | None:
        """The pass to send now (None: busy, or nothing to do). ``queued`` is the head of the
        shared queue; the caller dequeues ``Pass.admits`` when it sends the pass."""
        if self.busy is not None:
            return None
        chosen = self._choose(queued)
        if chosen is None:
            if not self._free:
                return None
            chosen = Pass("decode", ())  # nothing to run: only free what left
        out = Pass(chosen.kind, chosen.req_ids, tuple(self._free))
        self._free.clear()
        self.running.update(dict.fromkeys(out.admits))
        self.busy = out
        return out

    def done(self, finished: Iterable[str]) -> None:
        """The pass came back; ``finished`` requests left the batch (freed next pass)."""
        self.busy = None
        for req_id in finished:
            self.release(req_id)

    def failed(self) -> None:
        """The pass failed on some stage: its requests leave the stream. The stages before
        the failing one still hold them and those after it never saw the pass's ``free``, so
        both go into the next ``free`` (stages ignore ids they do not hold)."""
        failed, self.busy = self.busy, None
        if failed is None:
            return
        for req_id in failed.req_ids:
            self.running.pop(req_id, None)
        self._free.update(dict.fromkeys((*failed.free, *failed.req_ids)))

    def release(self, req_id: str) -> bool:
        """A running request left (finished, cancelled, timed out): free it next pass."""
        if req_id not in self.running:
            return False
        del self.running[req_id]
        self._free[req_id] = None
        return True

    def reset(self) -> list[str]:
        """A stage was lost: the pass in flight is gone; every running request leaves."""
        dropped = list(self.running)
        for req_id in dropped:
            self.release(req_id)
        self.busy = None
        self._decodes_left = 0
        return dropped

    # ---- policies -------------------------------------------------------------------------
    def _choose(self, queued: Sequence[str]) -> Pass | None:
        policy = self.knobs.policy
        if policy == "static":
            return self._static(queued)
        if policy == "continuous":
            return self._continuous(queued)
        return self._rra(queued)

    def _decode(self) -> Pass:
        return Pass("decode", tuple(self.running))

    def _static(self, queued: Sequence[str]) -> Pass | None:
        if self.running:
            return self._decode()
        if queued:
            return Pass("encode", tuple(queued[: self.knobs.batch]))
        return None

    def _continuous(self, queued: Sequence[str]) -> Pass | None:
        slots = self.knobs.batch - len(self.running)
        if slots > 0 and queued:
            return Pass("encode", tuple(queued[:slots]))
        return self._decode() if self.running else None

    def _rra(self, queued: Sequence[str]) -> Pass | None:
        if self._decodes_left == 0 or not self.running:  # a cycle boundary
            if queued:
                self._decodes_left = self.knobs.n_d
                return Pass("encode", tuple(queued[: self.knobs.batch]))
            if not self.running:
                return None
            self._decodes_left = self.knobs.n_d  # nothing to encode: decode a whole cycle
        self._decodes_left -= 1
        return self._decode()
