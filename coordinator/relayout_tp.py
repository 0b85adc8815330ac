"""A live pipeline re-layout that changes tp_size: stage workers re-grouped into other TP
groups (docs/adaptation.md, "tp_size changes live"), e.g. two tp-1 stages -> one tp-2 stage.

The phases are coordinator.relayout's (DRAIN, MIGRATE, REASSIGN, DONE); REASSIGN differs:

    places     the stage workers in their current order (stage, rank) take the new stages'
               ranks in order (stage 0 rank 0, stage 0 rank 1, ..., then spares); each gets a
               coordinator-assigned group id (``WorkerInfo.tp_group``: a worker's group is no
               longer read from its id stem), its rank and the group size
    step 1     every rank 0 (and every tp-1 stage and spare) gets its re-Assign:
               tp_rank/tp_size set, ``config["tp"] = {"group", "init": None}``; a rank 0 of a
               group of t > 1 binds a fresh rendezvous and says
               Ready(info={"relayout": e, "tp_rendezvous": "tcp://host:port"})
    step 2     the group's other ranks get their re-Assign with ``"init"`` = that address
    DONE       every worker's final Ready(info={"relayout": e, "reload_s"}) and every stage's
               ranks READY: the peers refresh and the new streams start (as Relayout)

Every old group is dissolved (rank 0 broadcasts REGROUP at a collective boundary, its
followers leave with it), so a group is never half old, half new. Worker side:
decoder_worker.regroup.

``TpRegroup`` is that REASSIGN, shared by the two drivers: ``TpRelayout`` (a pipeline plan)
and ``WaaTpRelayout`` (a staged WAA mesh: its encoder or decoder stages change tp_size, e.g.
an encoder of two tp-1 stages <-> one tp-2 stage; DRAIN and MIGRATE are WaaRelayout's, and
every stage worker is used: a WAA stage loop has no spare mode).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from common import protocol as P
from coordinator.pipeline_driver import StageLayout
from coordinator.registry import WorkerInfo, WorkerState
from coordinator.relayout import Relayout, RelayoutConfig, WaaRelayout, layout_stages
from coordinator.streams import StreamKnobs

if TYPE_CHECKING:
    from coordinator.pipeline_driver import PipelineDriver
    from coordinator.waa_layout import WaaLayout
    from coordinator.waa_pipeline import WaaPipelineDriver


@dataclass(frozen=True)
class TpStageLayout(StageLayout):
    """A StageLayout whose stages have their own TP group size (``tp[s]`` ranks)."""

    tp: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.tp) != self.num_stages or any(t < 1 for t in self.tp):
            raise ValueError(f"a TP stage layout needs one tp_size >= 1 per stage: {self.tp} "
                             f"for {self.num_stages} stages")

    @property
    def num_workers(self) -> int:
        return sum(self.tp)

    @property
    def tp_sizes(self) -> tuple[int, ...]:
        return self.tp


def pipeline_workers(driver: Any) -> list[WorkerInfo]:
    """Every stage worker (any rank), in stage then rank order (spares last)."""
    workers = [w for w in driver.co.members.registry if w.role == "pipeline"]
    return sorted(workers, key=lambda w: (w.stage is None, w.stage or 0, w.tp_rank,
                                          w.worker_id))


class TpRegroup:
    """REASSIGN by re-grouping every stage worker (module docstring); mixed into a Relayout
    whose ``layout`` has ``tp_sizes`` (one per global stage) and ``num_workers``."""

    driver: Any
    layout: Any
    epoch: int
    phase: str
    t0: float
    t_reassign: float | None
    num_streams: int
    waiting: dict[str, float]
    cost: dict[str, Any]
    held: dict[str, list[WorkerInfo]]  # group -> ranks > 0 awaiting its rank 0's address

    def _check_workers(self) -> None:
        workers = pipeline_workers(self.driver)
        if self.layout.num_workers > len(workers):
            raise ValueError(f"the new layout needs {self.layout.num_workers} stage workers "
                             f"(tp {list(self.layout.tp_sizes)}), {len(workers)} are "
                             "connected")

    def _reassign(self) -> None:
        """No pass in flight, no request on a stage: place every worker, send step 1."""
        drv = self.driver
        self.cost["drain_s"] = round(time.perf_counter() - self.t0, 4)
        self.t_reassign = time.perf_counter()
        self.phase = "reassign"
        old_stages = layout_stages(drv.layout)
        workers = pipeline_workers(drv)
        self._install()  # type: ignore[attr-defined]  # the driver's (Relayout, WaaRelayout)
        for info in workers:  # none READY before any Assign goes out: peers start empty
            info.state = WorkerState.ASSIGNED
        self._place(workers)
        for info in workers:
            self.waiting[info.worker_id] = time.perf_counter()
            if info.tp_rank == 0:
                drv.co.members.send(info, self._assign(info, None))
            else:
                assert info.tp_group is not None
                self.held.setdefault(info.tp_group, []).append(info)
        drv.co.log.info("relayout_reassign", epoch=self.epoch, old_stages=old_stages,
                        new_stages=layout_stages(self.layout),
                        streams=self.num_streams, workers=len(workers), **self.cost)

    def _place(self, workers: list[WorkerInfo]) -> None:
        """Ranks of the new stages in order, then spares; group ids from the epoch."""
        tps = self.layout.tp_sizes
        slots = [(s, r) for s, t in enumerate(tps) for r in range(t)]
        for i, info in enumerate(workers):
            if i < len(slots):
                s, r = slots[i]
                size = tps[s]
                info.stage, info.tp_rank, info.tp_size = s, r, size
                info.tp_group = f"e{self.epoch}.s{s}" if size > 1 else info.worker_id
            else:  # a spare: a group of its own
                info.stage, info.tp_rank, info.tp_size = None, 0, 1
                info.tp_group = info.worker_id

    def _assign(self, info: WorkerInfo, init: str | None) -> P.Assign:
        assign = self.driver.relayout_assign(info, self.epoch)
        group = info.tp_group if info.tp_size > 1 else None
        return dataclasses.replace(assign, config={**assign.config,
                                                   "tp": {"group": group, "init": init}})

    def on_ready(self, worker: WorkerInfo, info: dict[str, Any]) -> None:
        """Step 2 on a rank 0's rendezvous; a final Ready counts as in Relayout."""
        if self.phase == "reassign" and info.get("relayout") == self.epoch \
                and "tp_rendezvous" in info:
            worker.state = WorkerState.ASSIGNED  # not serving yet: its group is forming
            self._release(worker, str(info["tp_rendezvous"]))
            return
        super().on_ready(worker, info)  # type: ignore[misc]  # the Relayout after this mixin

    def _release(self, lead: WorkerInfo, init: str) -> None:
        followers = self.held.pop(lead.tp_group or "", [])
        self.cost.setdefault("rendezvous_s", {})[lead.worker_id] = round(
            time.perf_counter() - (self.t_reassign or self.t0), 4)
        for info in followers:
            self.driver.co.members.send(info, self._assign(info, init))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "held": {  # type: ignore[misc]  # the Relayout's
            g: [w.worker_id for w in ws] for g, ws in self.held.items()}}


class TpRelayout(TpRegroup, Relayout):
    """One switch of a PipelineDriver to a TpStageLayout (module docstring)."""

    layout: TpStageLayout

    def __init__(self, driver: PipelineDriver, layout: TpStageLayout, num_streams: int,
                 knobs: StreamKnobs, epoch: int, on_done: Callable[[dict[str, Any]], None],
                 cfg: RelayoutConfig) -> None:
        self.held = {}
        super().__init__(driver, layout, num_streams, knobs, epoch, on_done, cfg)
        self.cost["tp_sizes"] = list(layout.tp)


class WaaTpRelayout(TpRegroup, WaaRelayout):
    """One switch of a staged WAA mesh whose stages change tp_size (a WaaLayout with ``tp``):
    WaaRelayout's drain and migration (new runs), then every stage worker re-grouped. The
    stage workers keep their (stage, rank) order: e.g. encoder stages [0, 2) + [2, 4) on
    enc0 and enc1 become one tp-2 encoder stage [0, 4) with enc0 as rank 0."""

    layout: WaaLayout

    def __init__(self, driver: WaaPipelineDriver, layout: WaaLayout, num_micro: int,
                 epoch: int, on_done: Callable[[dict[str, Any]], None],
                 cfg: RelayoutConfig) -> None:
        self.held = {}
        super().__init__(driver, layout, num_micro, epoch, on_done, cfg)
        self.cost["tp_sizes"] = layout.side_tp()

    def _check_workers(self) -> None:
        workers = pipeline_workers(self.driver)
        if self.layout.num_workers != len(workers):  # no spare: a WAA stage loop cannot idle
            raise ValueError(f"the new staged WAA layout needs {self.layout.num_workers} "
                             f"stage workers (tp {self.layout.side_tp()}), {len(workers)} "
                             "are connected")
