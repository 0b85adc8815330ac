"""XSimulator, discrete-event: sample requests one by one, run the schedule, measure.

The closed form (simulator.py) works with expected batches; this simulator draws every request's
lengths (jointly from a trace when there is one), forms the actual batches, and times each step
with the same stage cost model. Agreement of the two checks the expected-value algebra (Little's
law, the RRA cycle offsets, the WAA merge wait). It also handles arrival processes.

Events are small objects with a ``time``; ``handle(sim)`` does the step that starts then and
returns the events it causes. Same seed, same result: one numpy Generator, and ties in time are
broken by insertion order.

    RRA / static / continuous, per stream (one micro-batch per pipeline stage):
        StreamStep(encode) -> N_D x StreamStep(decode) -> StreamStep(encode) ...
    Each StreamStep sends one pass through the stages, as the mesh does
    (``coordinator/streams.py``): every stage serves passes first come, first served, a stream
    has one pass in flight, and RRA streams keep their cycles in lock step (a stream at a cycle
    boundary waits while another is still inside the cycle of the same number). A pass's end is
    ``StageClock.run``: it waits at each stage for the passes sent before it, so a long encode
    holds up the other streams' decodes stage by stage (the pipeline fill the closed form's
    encode round charges).
    WAA:  EncoderStart --(period)--> EncoderStart ...
              `--(latency + KV handoff)--> BatchReady --> merged at the next DecoderRound
          DecoderRound -> DecoderRound ... (idle when empty, woken by BatchReady)
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

import numpy as np

from coordinator.planner.candidate import Candidate, Metrics, WorkloadStats
from coordinator.planner.costs import Costs
from coordinator.planner.des_events import (
    EMPTY,
    DecoderRound,
    EncoderStart,
    Event,
    StreamStep,
    waa_cap,
)
from coordinator.planner.layout import Pipeline
from coordinator.planner.simulator import simulate
from coordinator.planner.workload import Workload


@dataclass
class Requests:
    """Per-request lengths and lifecycle timestamps (NaN until reached)."""

    in_len: np.ndarray
    out_len: np.ndarray
    t_arrival: np.ndarray
    t_encode_start: np.ndarray = field(init=False)
    t_first_token: np.ndarray = field(init=False)
    t_finish: np.ndarray = field(init=False)
    t_p99_token: np.ndarray = field(init=False)  # when the p99-length-th token came out
    generated: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        n = self.in_len.size
        self.t_encode_start = np.full(n, np.nan)
        self.t_first_token = np.full(n, np.nan)
        self.t_finish = np.full(n, np.nan)
        self.t_p99_token = np.full(n, np.nan)
        self.generated = np.zeros(n, dtype=np.int64)


@dataclass
class DESResult:
    metrics: Metrics
    requests: Requests
    busy: list[list[tuple[float, float, str]]]  # per worker: (start, end, kind)
    window: tuple[float, float]


class Sim:
    """Shared state the events act on."""

    def __init__(self, cand: Candidate, workload: Workload, costs: Costs, num_requests: int,
                 seed: int, record_timeline: bool) -> None:
        self.cand, self.costs, self.record = cand, costs, record_timeline
        self.stats = WorkloadStats(workload)
        rng = np.random.default_rng(seed)
        ins, outs = workload.sample(rng, num_requests)
        arrivals = (workload.arrival.times(rng, num_requests) if workload.arrival
                    else np.zeros(num_requests))
        self.req = Requests(np.asarray(ins), np.asarray(outs), arrivals)
        self.next_req = 0
        self.closed = simulate(cand, self.stats, costs)
        self.pipes: dict[str, Pipeline] = dict(self.closed.pipelines)
        self.stage_busy: dict[tuple[str, int], float] = {}
        self.intervals: dict[tuple[str, int], list[tuple[float, float, str]]] = {}
        self._seq = itertools.count()
        self.queue: list[tuple[float, int, Event]] = []
        self.streams: dict[int, np.ndarray] = {}
        self.batch_samples: list[tuple[float, int]] = []  # (time, decode batch) per step
        self.clock = StageClock(len(self.pipes.get("pipeline", ())))
        self.cycle_no: dict[int, int] = {}  # rra: cycles each stream has started
        self.mid_cycle: set[int] = set()  # rra: streams inside a cycle (lock step)
        self.parked: list[int] = []  # rra: streams held back at a cycle boundary
        self.waa_state: dict = {"in_flight": 0, "ready": [], "blocked": False, "free_at": 0.0,
                                "decoder_idle": False, "active": EMPTY}
        if cand.policy.startswith("waa") and self.closed.pipelines:
            self.waa_state["cap"] = waa_cap(self.closed.extra)

    def active(self, stream: int) -> np.ndarray:
        return self.streams.get(stream, EMPTY)

    def set_active(self, stream: int, idx: np.ndarray) -> None:
        self.streams[stream] = idx

    # ---- request queue -------------------------------------------------------------------
    def take(self, now: float, limit: int) -> np.ndarray:
        """Up to ``limit`` requests that have arrived by ``now``, in arrival order."""
        end = self.next_req
        stop = min(self.req.in_len.size, self.next_req + limit)
        while end < stop and self.req.t_arrival[end] <= now:
            end += 1
        idx = np.arange(self.next_req, end)
        self.next_req = end
        self.req.t_encode_start[idx] = now
        return idx

    def next_arrival(self) -> float | None:
        if self.next_req >= self.req.in_len.size:
            return None
        return float(self.req.t_arrival[self.next_req])

    # ---- stage costs -----------------------------------------------------------------------
    def encode_times(self, pipe: Pipeline, idx: np.ndarray, kind: str | None = "stage"
                     ) -> list[float]:
        """``kind``: the fixed per-pass overhead (costs.py; None: riding in a charged pass)."""
        if idx.size == 0:
            return [0.0] * len(pipe)
        lens = self.req.in_len[idx].astype(np.float64)
        mean, eff = float(lens.mean()), float(np.sqrt((lens**2).mean()))
        return [self.costs.encode_stage(st, idx.size, mean, eff, kind) for st in pipe]

    def decode_times(self, pipe: Pipeline, active: np.ndarray, micro: int,
                     kind: str = "stage") -> list[float]:
        if active.size == 0:
            return [0.0] * len(pipe)
        ctx = float((self.req.in_len[active] + self.req.generated[active] + 1).mean())
        b = active.size / micro
        return [self.costs.decode_stage(st, b, ctx, kind) for st in pipe]

    def run_pass(self, times: list[float], start: float, kind: str) -> float:
        """Send a pipeline pass at ``start``; returns when it leaves the last stage."""
        spans = self.clock.run(times, start)
        for s, (begin, end) in enumerate(spans):
            key = ("pipeline", s)
            self.stage_busy[key] = self.stage_busy.get(key, 0.0) + times[s]
            if self.record and times[s] > 0:
                self.intervals.setdefault(key, []).append((begin, end, kind))
        return spans[-1][1] if spans else start

    # ---- rra lock step (coordinator/pipeline_driver.py ``_held_back``) ----------------------
    def held_back(self, stream: int, now: float) -> bool:
        """A stream at a cycle boundary with requests waiting may not start its next cycle
        while another stream is inside the cycle of the same number."""
        nxt = self.next_arrival()
        if nxt is None or nxt > now:
            return False
        mine = self.cycle_no.get(stream, 0)
        return any(self.cycle_no.get(o, 0) == mine for o in self.mid_cycle if o != stream)

    def leave_cycle(self, stream: int, now: float) -> list[Event]:
        """``stream`` is no longer inside a cycle: re-offer the streams it held back."""
        self.mid_cycle.discard(stream)
        parked, self.parked = self.parked, []
        return [StreamStep(now, p, 0) for p in parked]

    def busy(self, role: str, times: list[float], start: float, span: float, slot: int,
             slots: int, kind: str) -> None:
        """Charge each stage its time; for the timeline, place it at the stage's slot of the
        step (a pipeline diagram: stage s serves slot (s + slot) mod slots)."""
        for s, t in enumerate(times):
            key = (role, s)
            self.stage_busy[key] = self.stage_busy.get(key, 0.0) + t
            if self.record and t > 0:
                offset = ((s + slot) % max(slots, 1)) * span / max(slots, 1)
                self.intervals.setdefault(key, []).append((start + offset, start + offset + t,
                                                           kind))

    def emit_tokens(self, active: np.ndarray, t: float) -> np.ndarray:
        """Every active sequence gets one token at ``t``; returns the ones still running."""
        req = self.req
        req.generated[active] += 1
        first = active[req.generated[active] == 1]
        req.t_first_token[first] = t
        mark = active[req.generated[active] == self.stats.s99]
        req.t_p99_token[mark] = t
        done = req.generated[active] >= req.out_len[active]
        req.t_finish[active[done]] = t
        return active[~done]

    def push(self, event: Event) -> None:
        heapq.heappush(self.queue, (event.time, next(self._seq), event))

    def run(self, max_events: int) -> None:
        for _ in range(max_events):
            if not self.queue:
                return
            _, _, event = heapq.heappop(self.queue)
            for new in event.handle(self):
                self.push(new)
        raise RuntimeError(f"discrete-event simulation did not finish in {max_events} events")


class StageClock:
    """When each pipeline stage is next free. Passes are sent in time order and every stage
    serves them first come, first served along the same route, so a pass's stage times are
    settled when it is sent: it starts on stage s when it has left stage s-1 and the pass
    before it has left stage s."""

    def __init__(self, num_stages: int) -> None:
        self.free = [0.0] * num_stages

    def run(self, times: list[float], start: float) -> list[tuple[float, float]]:
        spans, t = [], start
        for s, dt in enumerate(times):
            begin = max(t, self.free[s])
            t = self.free[s] = begin + dt
            spans.append((begin, t))
        return spans


def run_des(cand: Candidate, workload: Workload, costs: Costs, *, num_requests: int = 20000,
            seed: int = 0, record_timeline: bool = False) -> DESResult:
    sim = Sim(cand, workload, costs, num_requests, seed, record_timeline)
    if not sim.closed.pipelines:
        raise ValueError(f"candidate {cand} is not a valid schedule: {sim.closed.reason}")
    if cand.policy.startswith("waa"):
        sim.push(EncoderStart(0.0))
        sim.push(DecoderRound(0.0))
    else:
        for stream in range(len(sim.pipes["pipeline"])):
            sim.push(StreamStep(0.0, stream))
    sim.run(max_events=200 * num_requests + 10000)
    return _measure(sim)


def _measure(sim: Sim) -> DESResult:
    from coordinator.planner.des_measure import measure

    return measure(sim)
