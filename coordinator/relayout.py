"""Re-laying out a pipeline plan's stage workers while serving (docs/adaptation.md).

A new plan may put other layer ranges on the stages, use another number of stages, or run
another number of streams. T5 (encoder-decoder) stages get new ranges of both stacks
(``StageLayout.encoder_layers``); its migrated requests re-run from the prompt alone and
replay the tokens the client has (coordinator.requests: checked, not sent twice).
Stage workers cannot be re-laid out under a pass, so the switch is

    DRAIN      no new request is encoded (arrivals queue in the coordinator, none is refused);
               the streams decode what they run, up to ``drain_timeout_s``
    MIGRATE    past the timeout, each stream's pass in flight comes back, then its requests
               leave the stream and go back to the head of the queue: they are re-encoded on
               the new layout from their prompt plus the tokens the client already has
               (migration by recompute; the client's stream continues at the next index)
    REASSIGN   every stage worker gets a re-Assign (``config["relayout"]`` = the epoch) with
               its new stage and layer range, or none ("spare": it frees its layers); it
               rebuilds its backend from its host-memory weights (common.weightstore) and
               says Ready again with the rebuild time
    DONE       every new stage READY: the peers refresh, the new streams start with the new
               knobs, the queue (migrated requests first) is served

Nothing is dropped or duplicated: a request is in exactly one place at each step (a stream of
the old layout, the queue, or a stream of the new layout), and no pass of the old layout is in
flight when the workers are re-assigned, so no stale token can reach a request.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from coordinator.registry import WorkerInfo, WorkerState
from coordinator.requests import State
from coordinator.streams import Stream, StreamKnobs

if TYPE_CHECKING:
    from coordinator.pipeline_driver import PipelineDriver, StageLayout
    from coordinator.waa_layout import WaaLayout
    from coordinator.waa_pipeline import WaaPipelineDriver


@dataclass(frozen=True)
class RelayoutConfig:
    """How long the old layout may drain before migration, and the new one may take to load."""

    drain_timeout_s: float = 2.0
    ready_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.drain_timeout_s < 0:
            raise ValueError("drain_timeout_s must be >= 0")
        if self.ready_timeout_s <= 0:
            raise ValueError("ready_timeout_s must be > 0")


class Relayout:
    """One switch of a PipelineDriver to a new StageLayout (phases: module docstring).
    WaaRelayout (below) is the same switch for a staged WAA mesh."""

    def __init__(self, driver: Any, layout: StageLayout | WaaLayout, num_streams: int,
                 knobs: StreamKnobs | None, epoch: int,
                 on_done: Callable[[dict[str, Any]], None], cfg: RelayoutConfig) -> None:
        self.driver, self.layout, self.num_streams, self.knobs = driver, layout, num_streams, knobs
        self._check_workers()
        if num_streams < 1:
            raise ValueError("a layout needs at least one stream")
        self.epoch, self.on_done, self.cfg = epoch, on_done, cfg
        self.phase = "drain"
        self.t0 = time.perf_counter()
        self.t_reassign: float | None = None
        self.waiting: dict[str, float] = {}  # worker id -> when its re-Assign went out
        self.reload_s: dict[str, float] = {}  # worker id -> rebuild time it reported
        self.cost: dict[str, Any] = {"migrated_requests": 0, "rerun_tokens": 0,
                                     "drained_requests": self._running()}

    # ---- what differs between the drivers (WaaRelayout, TpRelayout override these) ---------
    def _check_workers(self) -> None:
        workers = stage_workers(self.driver)
        if self.layout.num_stages > len(workers):
            raise ValueError(f"the new layout has {self.layout.num_stages} stages but only "
                             f"{len(workers)} tp-1 stage workers are connected")

    def _running(self) -> int:
        return sum(len(s.running) for s in self.driver.streams)

    def _busy(self) -> bool:
        """A pass in flight or a request on an old stream: not re-assignable yet."""
        return any(s.busy or s.running for s in self.driver.streams)

    def _install(self) -> None:
        assert self.knobs is not None
        self.driver.install(self.layout, [Stream(i, self.knobs)
                                          for i in range(self.num_streams)])

    @property
    def admits(self) -> bool:
        """Streams may take queued requests: never while switching."""
        return False

    @property
    def passes_allowed(self) -> bool:
        """Old streams may decode while draining (up to the timeout), nothing after."""
        return self.phase == "drain" and not self._timed_out()

    def _timed_out(self) -> bool:
        return time.perf_counter() - self.t0 > self.cfg.drain_timeout_s

    # ---- steps (each pump / tick) -------------------------------------------------------
    def step(self) -> None:
        if self.phase == "drain":
            if self._timed_out():
                self._migrate()
            if not self._busy():
                self._reassign()
        elif self.phase == "reassign":
            if not self.waiting and self.driver.stages_ready():
                self._finish()
            elif time.perf_counter() - (self.t_reassign or self.t0) > self.cfg.ready_timeout_s:
                self._fail(f"{sorted(self.waiting)} did not say Ready within "
                           f"{self.cfg.ready_timeout_s:g} s")

    def _migrate(self) -> None:
        """Idle streams hand their requests back to the queue (recompute on the new layout)."""
        co = self.driver.co
        for stream in self.driver.streams:
            if stream.busy is not None:
                continue  # its pass comes back first (its tokens are relayed as usual)
            for req_id in list(stream.running):
                stream.release(req_id)
                request = co.table.get(req_id)
                if request is None:
                    continue
                co.table.requeue_front(request)
                self.cost["migrated_requests"] += 1
                self.cost["rerun_tokens"] += len(request.tokens)

    def _reassign(self) -> None:
        """No pass in flight, no request on a stage: give every stage worker its new place."""
        drv = self.driver
        self.cost["drain_s"] = round(time.perf_counter() - self.t0, 4)
        self.t_reassign = time.perf_counter()
        self.phase = "reassign"
        old_stages = layout_stages(drv.layout)
        self._install()
        workers = stage_workers(drv)
        for info in workers:  # none READY before any Assign goes out: peers start empty
            info.state = WorkerState.ASSIGNED
        for i, info in enumerate(workers):
            info.stage = i if i < self.layout.num_stages else None
        for info in workers:
            self.waiting[info.worker_id] = time.perf_counter()
            drv.co.members.send(info, drv.relayout_assign(info, self.epoch))
        drv.co.log.info("relayout_reassign", epoch=self.epoch, old_stages=old_stages,
                        new_stages=layout_stages(self.layout), **encoder_stages(self.layout),
                        streams=self.num_streams, workers=len(workers), **self.cost)

    def on_ready(self, worker: WorkerInfo, info: dict[str, Any]) -> None:
        if self.phase != "reassign" or info.get("relayout") != self.epoch:
            return
        sent = self.waiting.pop(worker.worker_id, None)
        if sent is not None:
            self.reload_s[worker.worker_id] = float(info.get("reload_s", 0.0))
            self.cost.setdefault("ready_s", {})[worker.worker_id] = round(
                time.perf_counter() - sent, 4)

    def lost(self, worker_id: str) -> None:
        """A stage worker died mid-switch: the new layout cannot be completed."""
        if self.phase in ("drain", "reassign"):
            self._fail(f"stage worker {worker_id} was lost during the re-layout")

    def _finish(self) -> None:
        end = time.perf_counter()
        self.phase = "done"
        self.cost.update({
            "reload_s": round(max(self.reload_s.values(), default=0.0), 4),
            "reload_s_per_worker": {k: round(v, 4) for k, v in self.reload_s.items()},
            "reassign_s": round(end - (self.t_reassign or end), 4),
            "pause_s": round(end - self.t0, 4),  # no request was encoded from t0 to now
            "stages": layout_stages(self.layout), "streams": self.num_streams,
            **encoder_stages(self.layout)})
        self.driver.switch = None
        self.driver.on_stage_ready()
        self.on_done({"ok": True, **self.cost})

    def _fail(self, why: str) -> None:
        self.phase = "failed"
        self.driver.switch = None
        self.driver.co.log.error("relayout_failed", epoch=self.epoch, error=why)
        self.on_done({"ok": False, "error": why, **self.cost})

    def describe(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "phase": self.phase,
                "elapsed_s": round(time.perf_counter() - self.t0, 3),
                "waiting": sorted(self.waiting), **self.cost}


class WaaRelayout(Relayout):
    """The same switch for a staged WAA mesh (coordinator.waa_pipeline): the stage workers
    get another encoder/decoder split or other layer ranges. DRAIN: no encode pass starts;
    encode passes in flight come back (their requests join micro-batches), micro-batches
    decode until ``drain_timeout_s``. MIGRATE: each idle micro-batch's requests are re-queued
    as a new run (``table.requeue``: a new wire id, so a late KVHandoff of the old run, which
    travels worker to worker, can never be taken for the new one; the new decoder stages free
    the old ids in their first pass). REASSIGN: every worker its new side, index and range;
    the worker swaps its stage loop (common.roleswitch). ``num_streams`` is B_m. Stages that
    are or become TP groups: coordinator.relayout_tp.WaaTpRelayout (same drain and migration,
    the workers re-grouped)."""

    def __init__(self, driver: WaaPipelineDriver, layout: WaaLayout, num_micro: int,
                 epoch: int, on_done: Callable[[dict[str, Any]], None],
                 cfg: RelayoutConfig) -> None:
        self.stale: list[str] = []  # the migrated requests' old wire ids
        super().__init__(driver, layout, num_micro, None, epoch, on_done, cfg)

    def _check_workers(self) -> None:
        workers = stage_workers(self.driver)
        served = [w for w in self.driver.co.members.registry if w.role == "pipeline"]
        if len(workers) != len(served) or self.layout.tp:  # coordinator.relayout_tp
            raise ValueError("TP stages are re-grouped by WaaTpRelayout, not WaaRelayout")
        if self.layout.num_stages != len(workers):  # no spare: a WAA stage loop cannot idle
            raise ValueError(f"the new staged WAA layout has {self.layout.num_stages} stages, "
                             f"{len(workers)} tp-1 stage workers are connected")

    def _running(self) -> int:
        drv = self.driver
        return len({r for ids in drv._encoding.values() for r in ids}  # noqa: SLF001
                   | {r for mb in drv.micro for r in (*mb.running, *mb.joining)})

    def _busy(self) -> bool:
        drv = self.driver
        return bool(drv._encoding) or any(  # noqa: SLF001
            mb.busy is not None or mb.running or mb.joining for mb in drv.micro)

    def _migrate(self) -> None:
        """Idle micro-batches hand their requests back to the queue, as new runs, in order."""
        drv, table = self.driver, self.driver.co.table
        moving = []
        for mb in drv.micro:
            if mb.busy is not None:
                continue  # its pass comes back first (its tokens are relayed as usual)
            drv._sync(mb)  # noqa: SLF001 - the answered ones leave first
            for wire_id in (*mb.running, *mb.joining):
                request = table.get_wire(wire_id)
                if request is not None and request.state is not State.DONE:
                    moving.append(request)
                    self.stale.append(wire_id)
            mb.running, mb.joining = [], []
        for request in reversed(moving):  # requeue puts each at the head: keep their order
            table.requeue(request)
            self.cost["migrated_requests"] += 1
            self.cost["rerun_tokens"] += len(request.tokens)

    def _install(self) -> None:
        # the old micro-batches' pending frees too: a late KVHandoff of theirs is dropped
        frees = [r for mb in self.driver.micro for r in mb.free]
        self.driver.install(self.layout, self.num_streams, self.stale + frees)


def layout_stages(layout: Any) -> Any:
    """A layout's stages for logs and stats: [[lo, hi], ...] (pipeline), or per side (WAA)."""
    if hasattr(layout, "layers"):
        return [list(r) for r in layout.layers]
    return {"encoder": [list(r) for r in layout.encoder],
            "decoder": [list(r) for r in layout.decoder]}


def encoder_stages(layout: Any) -> dict[str, Any]:
    """A T5 pipeline layout's encoder-stack ranges per stage, for logs and costs (``stages``
    stays the decoder ranges, as the layout state reads it); {} for other layouts."""
    enc = getattr(layout, "encoder_layers", None)
    return {"encoder_stages": [list(r) for r in enc]} if enc else {}


def stage_workers(driver: PipelineDriver | WaaPipelineDriver) -> list[WorkerInfo]:
    """The single-rank stage workers, in their current stage order (spares last)."""
    workers = [w for w in driver.co.members.registry
               if w.role == "pipeline" and w.tp_size == 1]
    return sorted(workers, key=lambda w: (w.stage is None, w.stage or 0, w.worker_id))
