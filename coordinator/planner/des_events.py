"""The discrete-event simulator's events: each handles the step starting at its time.

A handler reads and updates the shared :class:`~coordinator.planner.des.Sim` state and returns
the events it causes (the next step of the same stream, a batch becoming ready, a wake-up at
the next arrival). Step effects (tokens, finish times) are stamped at the step's end time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from coordinator.planner.costs import round_time

if TYPE_CHECKING:
    from coordinator.planner.des import Sim

EMPTY = np.zeros(0, dtype=np.int64)


@dataclass
class Event:
    time: float

    def handle(self, sim: Sim) -> list[Event]:
        raise NotImplementedError


def _wait_for_arrival(sim: Sim, make: type, *args: int) -> list[Event]:
    nxt = sim.next_arrival()
    return [] if nxt is None else [make(nxt, *args)]


@dataclass
class StreamStep(Event):
    """One step of one pipeline stream (RRA: step 0 encodes, 1..N_D decode)."""

    stream: int
    step: int = 0

    def handle(self, sim: Sim) -> list[Event]:
        return {"rra": self._rra, "static": self._static,
                "continuous": self._continuous}[sim.cand.policy](sim)

    def _rra(self, sim: Sim) -> list[Event]:
        pipe, t, active = sim.pipes["pipeline"], self.time, sim.active(self.stream)
        if self.step == 0:
            return self._rra_encode(sim)
        events: list[Event] = []
        if active.size == 0:
            return [*sim.leave_cycle(self.stream, t), StreamStep(t, self.stream, 0)]
        if self.step == 1:
            sim.batch_samples.append((t, active.size))
        if self.step == sim.cand.N_D:  # the cycle's last pass is sent: the mesh's mid_cycle
            events = sim.leave_cycle(self.stream, t)
        end = sim.run_pass(sim.decode_times(pipe, active, 1), t, "decode")
        sim.set_active(self.stream, sim.emit_tokens(active, end))
        nxt = self.step + 1 if self.step < sim.cand.N_D else 0
        return [StreamStep(end, self.stream, nxt), *events]

    def _rra_encode(self, sim: Sim) -> list[Event]:
        pipe, t, active = sim.pipes["pipeline"], self.time, sim.active(self.stream)
        if sim.held_back(self.stream, t):
            sim.parked.append(self.stream)
            return []
        idx = sim.take(t, sim.cand.B_E)
        if idx.size == 0 and active.size == 0:
            return _wait_for_arrival(sim, StreamStep, self.stream, 0)
        if idx.size:
            sim.cycle_no[self.stream] = sim.cycle_no.get(self.stream, 0) + 1
        sim.mid_cycle.add(self.stream)
        end = sim.run_pass(sim.encode_times(pipe, idx), t, "encode")
        sim.set_active(self.stream, np.concatenate([active, idx]))
        return [StreamStep(end, self.stream, 1)]

    def _static(self, sim: Sim) -> list[Event]:
        """No joins until the batch's longest request ends, as the mesh runs it
        (coordinator/streams.py): a step decodes the batch's live rows only, and a request is
        answered when its own last token comes (the batch diminishes); one pass per step."""
        pipe, t = sim.pipes["pipeline"], self.time
        if self.step == 0:
            idx = sim.take(t, sim.cand.B_E)
            if idx.size == 0:
                return _wait_for_arrival(sim, StreamStep, self.stream, 0)
            sim.set_active(self.stream, idx)
            sim.batch_samples.append((t, idx.size))
            end = sim.run_pass(sim.encode_times(pipe, idx), t, "encode")
            return [StreamStep(end, self.stream, 1)]
        live = sim.active(self.stream)
        times = sim.decode_times(pipe, live, 1)
        end = sim.run_pass(times, t, "decode")
        left = sim.emit_tokens(live, end)
        sim.set_active(self.stream, left)
        return [StreamStep(end, self.stream, self.step + 1 if left.size else 0)]

    def _continuous(self, sim: Sim) -> list[Event]:
        pipe, t, active = sim.pipes["pipeline"], self.time, sim.active(self.stream)
        idx = sim.take(t, sim.cand.B_E - active.size)
        if idx.size == 0 and active.size == 0:
            return _wait_for_arrival(sim, StreamStep, self.stream, 0)
        # one pass carries the decode step and the prefills: its fixed overhead once
        prefill = sim.encode_times(pipe, idx, None if active.size else "stage")
        times = [d + e for d, e in zip(sim.decode_times(pipe, active, 1), prefill,
                                       strict=True)]
        end = sim.run_pass(times, t, "iteration")
        both = np.concatenate([active, idx])
        sim.batch_samples.append((t, both.size))
        sim.set_active(self.stream, sim.emit_tokens(both, end))
        return [StreamStep(end, self.stream)]


@dataclass
class EncoderStart(Event):
    """WAA: the encoder group starts a batch if fewer than ``cap`` batches await merging."""

    def handle(self, sim: Sim) -> list[Event]:
        w, t = sim.waa_state, self.time
        if w["in_flight"] >= w["cap"]:
            w["blocked"] = True
            return []
        idx = sim.take(t, sim.cand.B_E)
        if idx.size == 0:
            return _wait_for_arrival(sim, EncoderStart)
        times = sim.encode_times(sim.pipes["encoder"], idx, "waa_encode")
        latency, period = sum(times), max(times)
        hand = sim.costs.handoff(sim.pipes["decoder"], float(sim.req.in_len[idx].sum()))
        w["in_flight"] += 1
        w["free_at"] = t + period
        sim.busy("encoder", times, t, latency, 0, 1, "encode")
        return [BatchReady(t + latency + hand, idx), EncoderStart(t + period)]


@dataclass
class BatchReady(Event):
    """WAA: an encoded batch's KV has reached the decoders; it joins at the next round."""

    idx: np.ndarray

    def handle(self, sim: Sim) -> list[Event]:
        w = sim.waa_state
        w["ready"].append(self.idx)
        if w["decoder_idle"]:
            w["decoder_idle"] = False
            return [DecoderRound(self.time)]
        return []


@dataclass
class DecoderRound(Event):
    """WAA: merge ready batches, then every micro-batch advances one token."""

    def handle(self, sim: Sim) -> list[Event]:
        w, t = sim.waa_state, self.time
        merged = w["ready"]
        w["ready"] = []
        w["in_flight"] -= len(merged)
        active = np.concatenate([w["active"], *merged]) if merged else w["active"]
        events: list[Event] = []
        if merged and w["blocked"]:
            w["blocked"] = False
            events.append(EncoderStart(max(t, w["free_at"])))
        if active.size == 0:
            w["active"], w["decoder_idle"] = EMPTY, True
            return events
        m = sim.cand.B_m
        sim.batch_samples.append((t, active.size))
        times = sim.decode_times(sim.pipes["decoder"], active, m, "waa_decode")
        span = float(round_time(times, m))
        sim.busy("decoder", [m * x for x in times], t, span, 0, m, "decode")
        w["active"] = sim.emit_tokens(active, t + span)
        return [*events, DecoderRound(t + span)]


def waa_cap(extra: dict[str, float]) -> int:
    """Batches the encoder may have started but not yet merged (see simulator._waa)."""
    ahead = extra["encode_latency_s"] + extra["handoff_s"]
    if extra["encode_period_s"] <= extra["round_s"]:
        return max(1, math.ceil(ahead / extra["round_s"] - 1e-9))
    return math.ceil(ahead / extra["encode_period_s"] - 1e-9) + 1
