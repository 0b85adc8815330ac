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

A group that changes is dissolved (rank 0 broadcasts REGROUP at a collective boundary, its
followers leave with it), so a group is never half old, half new. A group that stays (the same
workers in the same rank order, tp size and layer ranges: ``kept_stages``) is KEPT: no
REGROUP, no rebuild; its rank 0 alone gets a "keep" re-Assign (``config["tp"]["keep"]``) on
which it drops the KV it still holds (the pipeline re-runs a migrated request under the same
id, which the old KV would collide with) and takes its new stage index, then says Ready; its
followers get nothing and stay READY. Worker side: decoder_worker.regroup.

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


def check_heads(co: Any, tp_sizes: Any) -> None:
    """Refuse before draining a tp size the model's heads cannot be split by (every rank
    would fail its shard build mid-switch: common.engine.tp.head_range / kv_head_range).
    A null-model mesh (no ``model_config``: the coordinator was given a shape) has no heads
    to split: any tp size goes."""
    if not getattr(co.cfg, "model_config", None):
        return
    model = co.model
    heads, kv = model.num_heads, getattr(model, "num_kv_heads", None) or model.num_heads
    for t in sorted(set(tp_sizes)):
        if heads % t or (t <= kv and kv % t):
            fits = [d for d in range(1, heads + 1) if not heads % d and (d > kv or not kv % d)]
            raise ValueError(f"tp_size {t} does not split the model's {heads} attention heads "
                             f"({kv} KV heads); possible tp sizes: {fits}")


def kept_stages(workers: list[WorkerInfo], old: Any, new: Any) -> dict[int, int]:
    """New stage -> old stage of each group the switch leaves alone: the new stage's slots
    (``TpRegroup._place``: workers in (stage, rank) order) hold exactly one old stage's ranks
    in rank order, with its tp size and its layer ranges. Its stage index may change (the
    keep re-Assign tells rank 0; the next hop comes with the peers refresh), except for a T5
    stage whose "hand the encoder output onward" flag (set at build) would change."""
    by_stage: dict[int, list[WorkerInfo]] = {}
    for w in workers:
        if w.stage is not None:
            by_stage.setdefault(w.stage, []).append(w)
    out: dict[int, int] = {}
    lo = 0
    for s, t in enumerate(new.tp_sizes):
        slot, lo = workers[lo:lo + t], lo + t
        o = slot[0].stage if slot else None
        if o is None or [w.worker_id for w in by_stage.get(o, [])] != [
                w.worker_id for w in slot]:
            continue
        if [w.tp_rank for w in slot] != list(range(t)) or any(w.tp_size != t for w in slot):
            continue
        if o >= old.num_stages or old.layers[o] != new.layers[s]:
            continue
        if (old.encoder_layers is None) != (new.encoder_layers is None):
            continue
        if new.encoder_layers is not None and (
                old.encoder_layers[o] != new.encoder_layers[s]
                or (o + 2 < old.num_stages) != (s + 2 < new.num_stages)):
            continue
        out[s] = o
    return out


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
        check_heads(self.driver.co, self.layout.tp_sizes)
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
        old_stages, old_layout = layout_stages(drv.layout), drv.layout
        workers = pipeline_workers(drv)
        kept = self._kept(workers, old_layout)
        groups = {w.worker_id: w.tp_group for w in workers}
        self._install()  # type: ignore[attr-defined]  # the driver's (Relayout, WaaRelayout)
        self._place(workers)
        for info in workers:  # none READY before any Assign goes out: peers start empty
            if info.stage in kept:
                info.tp_group = groups[info.worker_id]  # the same gloo group lives on
                if info.tp_rank > 0:
                    continue  # a kept follower: nothing to do, stays READY
            info.state = WorkerState.ASSIGNED
        self.cost["kept_groups"] = [
            {"stage": s, "old_stage": o, "group": w[0].tp_group or w[0].worker_id,
             "workers": [x.worker_id for x in w]}
            for s, o in sorted(kept.items()) for w in [[x for x in workers if x.stage == s]]]
        for info in workers:
            if info.stage in kept:
                if info.tp_rank == 0:
                    self.waiting[info.worker_id] = time.perf_counter()
                    drv.co.members.send(info, self._assign(info, None, keep=True))
                continue
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

    def _kept(self, workers: list[WorkerInfo], old_layout: Any) -> dict[int, int]:
        """New stage -> old stage of each group left alone (``kept_stages``)."""
        return kept_stages(workers, old_layout, self.layout)

    def _assign(self, info: WorkerInfo, init: str | None, keep: bool = False) -> P.Assign:
        assign = self.driver.relayout_assign(info, self.epoch)
        group = info.tp_group if info.tp_size > 1 else None
        tp: dict[str, Any] = {"group": group, "init": init}
        if keep:
            tp["keep"] = True
        return dataclasses.replace(assign, config={**assign.config, "tp": tp})

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

    def _kept(self, workers: list[WorkerInfo], old_layout: Any) -> dict[int, int]:
        """None: a WAA stage's loop and KV routes are built for its place; all rebuilt."""
        return {}

    def _check_workers(self) -> None:
        check_heads(self.driver.co, self.layout.tp_sizes)
        workers = pipeline_workers(self.driver)
        if self.layout.num_workers != len(workers):  # no spare: a WAA stage loop cannot idle
            raise ValueError(f"the new staged WAA layout needs {self.layout.num_workers} "
                             f"stage workers (tp {self.layout.side_tp()}), {len(workers)} "
                             "are connected")
