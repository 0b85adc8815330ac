"""A pipeline stage worker's live TP re-group (docs/adaptation.md, "tp_size changes live").

A re-plan may put two tp-1 stages into one tp-2 stage (or the reverse). The TP group a worker
belongs to, its rank and the group size then come from the coordinator's re-Assign, not from
the command line (``--tp-rank/--tp-size/--tp-init`` only describe the launch's group)::

    coordinator (coordinator.relayout_tp): drained pipeline, no pass in flight
      --> Assign(tp_rank=0, tp_size=t, config={"relayout": e, "tp": {"group", "init": None}})
          to each new group's rank 0 (and a tp-1 stage or a spare: its whole new place)
    rank 0:  leaves its old group (REGROUP header: its followers leave at the same collective
             boundary), binds a fresh TCPStore on a free port
      --> Ready(info={"relayout": e, "tp_rendezvous": "tcp://host:port"})
    coordinator
      --> Assign(tp_rank=r, tp_size=t, config={..., "tp": {"group", "init": that address}})
          to ranks 1..t-1
    every rank: joins the new gloo group, builds its shard of the stage from the process's
             host-memory weights (common.weightstore: ``HostWeights.get`` slices), swaps its
             loop: rank 0 a StageLoop (the data path), others a FollowerLoop
      --> Ready(info={"relayout": e, "reload_s": ...})

A group the switch leaves as it is gets ``config["tp"]["keep"]`` on its rank 0 only
(``keep_stage``: the stage loop stays, its KV is dropped, no REGROUP).

A staged WAA stage worker (coordinator.relayout_tp.WaaTpRelayout) takes the same steps; its
Assign's ``config["pipeline"]["waa"]`` names its side, and the new loop is that side's stage
loop (``waa_regrouped``: decoder_worker.waa_stage.build_waa_loop over the new group).

The stage loop hands the Assign to ``run_worker`` (``loop.switch_to``), which calls
``regroup``; the process keeps its link (id, sockets, heartbeats), whose settings take the new
rank and size (a restarted coordinator then hears the current placement in the Hello).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import socket
import time
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from common import protocol as P
from common.workerconfig import WorkerConfig
from common.workerlink import WorkerLink

_STORE: list[Any] = []  # rank 0's TCPStore of the current group (must outlive the group)


@dataclasses.dataclass(frozen=True)
class TpPlace:
    """What a TP re-Assign says about this worker's new group."""

    group: str | None
    rank: int
    size: int
    init: str | None

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"bad TP place: rank {self.rank} of {self.size}")
        if self.rank > 0 and not self.init:
            raise ValueError("a TP rank > 0 needs the group's rendezvous (tp.init)")

    @classmethod
    def from_assign(cls, assign: P.Assign) -> TpPlace:
        tp = assign.config.get("tp")
        if not isinstance(tp, dict):
            raise ValueError('a TP re-group Assign needs config["tp"] = {"group", "init"}')
        init = tp.get("init")
        return cls(group=tp.get("group"), rank=int(assign.tp_rank), size=int(assign.tp_size),
                   init=str(init) if init else None)


def regroup(cfg: WorkerConfig, link: WorkerLink, assign: P.Assign,
            log: Any) -> tuple[WorkerConfig, Any]:
    """Join the new group, build this rank's stage, say Ready; returns (settings, loop)."""
    from common.workermain import FollowerLoop
    from decoder_worker.pipeline import StageLoop

    start = time.perf_counter()
    epoch = assign.config.get("relayout")
    place = TpPlace.from_assign(assign)
    stage = (assign.config.get("pipeline") or {}).get("stage")
    init = place.init
    if place.rank == 0 and place.size > 1:  # step 1: a fresh rendezvous, told to the others
        init = _bind_rendezvous(cfg, place)
        link.ready({"relayout": epoch, "tp_rendezvous": init})
    new_cfg = dataclasses.replace(cfg, tp_rank=place.rank, tp_size=place.size, tp_init=init,
                                  stage=stage)
    link.cfg = new_cfg  # the Hello to a restarted coordinator names the current placement
    gc.unfreeze()  # the old stage's backend (and its KV) is garbage now
    gc.collect()
    waa = (assign.config.get("pipeline") or {}).get("waa")
    loop: Any
    if waa is not None:  # a staged WAA stage: its side's loop (decoder_worker.waa_stage)
        loop = waa_regrouped(new_cfg, link, assign, log, place)
    else:
        backend = build_regrouped(new_cfg, assign, place)
        if place.rank > 0 and cfg.backend == "engine":  # a null rank > 0 idles in a StageLoop
            loop = FollowerLoop(backend, link, log)
        else:
            loop = StageLoop(new_cfg, link, backend, log)
    gc.collect()
    gc.freeze()
    reload_s = round(time.perf_counter() - start, 4)
    log.info("tp_regroup", epoch=epoch, group=place.group, tp_rank=place.rank,
             tp_size=place.size, stage=stage, layer_range=assign.layer_range,
             side=waa["side"] if waa else None, reload_s=reload_s)
    link.ready({"pid": os.getpid(), "backend": cfg.backend, "relayout": epoch,
                "reload_s": reload_s})
    return new_cfg, loop


def keep_stage(loop: Any, assign: P.Assign) -> None:
    """A kept group's rank 0 (coordinator.relayout_tp.kept_stages): same ranks, tp size and
    layers, so no REGROUP and no rebuild. It drops every request it still holds (the switch
    drained or migrated them all, and a migrated request is re-run under the same id, which
    the old KV would collide with; a TP stage's FREE reaches its followers on the TP wire),
    takes its new stage index (stage times, a restarted coordinator's Hello), says Ready."""
    start = time.perf_counter()
    epoch = assign.config.get("relayout")
    place = TpPlace.from_assign(assign)
    stage = int((assign.config.get("pipeline") or {})["stage"])
    if (place.rank, place.size) != (loop.cfg.tp_rank, loop.cfg.tp_size):
        why = (f"a keep re-Assign must not move rank {loop.cfg.tp_rank} of "
               f"{loop.cfg.tp_size} (got {place.rank} of {place.size})")
        loop.log.error("relayout_failed", epoch=epoch, error=why)
        loop.link.send(P.Error(code="internal", message=f"re-layout {epoch}: {why}"))
        return
    held = list(loop.backend.seqs)
    loop.backend.drop(held)
    loop.backend.stage_index = stage
    loop.cfg = dataclasses.replace(loop.cfg, stage=stage)
    loop.link.cfg = loop.cfg
    reload_s = round(time.perf_counter() - start, 4)
    loop.log.info("tp_kept", epoch=epoch, group=place.group, stage=stage, dropped=len(held),
                  layer_range=assign.layer_range, reload_s=reload_s)
    loop.link.ready({"pid": os.getpid(), "backend": loop.cfg.backend, "relayout": epoch,
                     "reload_s": reload_s, "kept": True})


def waa_regrouped(cfg: WorkerConfig, link: WorkerLink, assign: P.Assign, log: Any,
                  place: TpPlace) -> Any:
    """A staged WAA stage's loop in its new place (coordinator.relayout_tp.WaaTpRelayout):
    a tp-1 stage, or this rank of a TP stage (the new gloo group, then the shard from the
    host-memory weights); rank 0 runs the side's stage loop, the others a FollowerLoop."""
    from decoder_worker.waa_stage import build_waa_loop

    tp = _join_group(cfg, place) if place.size > 1 else None
    return build_waa_loop(cfg, link, assign, log, tp=tp)


def build_regrouped(cfg: WorkerConfig, assign: P.Assign, place: TpPlace) -> Any:
    """This rank's backend in its new place: a spare, a tp-1 stage, or a shard of a TP stage
    (the null model has no math to share: no gloo group)."""
    from common.backend_stage import NullStageBackend
    from common.models.config import ModelConfig
    from decoder_worker.pipeline import build_stage_backend

    if assign.config.get("pipeline") is None:  # a spare: holds nothing
        return NullStageBackend(ModelConfig.from_dict(assign.config["model"]), False, False)
    if place.size == 1 or cfg.backend != "engine":
        return build_stage_backend(cfg, assign)
    return tp_stage_backend(cfg, assign, _join_group(cfg, place))


def _join_group(cfg: WorkerConfig, place: TpPlace) -> Any:
    """The new gloo group (blocks until every rank joined). Every rank passes the store
    itself (rank 0 its own, the others a client of it): the same keys on every rank."""
    import torch.distributed as dist

    from common.engine.tp import TPGroup

    timeout = timedelta(seconds=cfg.heartbeat_timeout_s * 4)
    if place.rank == 0:
        store = _STORE[0]
    else:
        assert cfg.tp_init is not None
        where = urlsplit(cfg.tp_init)
        if where.scheme != "tcp" or where.hostname is None or where.port is None:
            raise ValueError(f"bad TP rendezvous {cfg.tp_init!r}: want tcp://HOST:PORT")
        store = dist.TCPStore(where.hostname, where.port, place.size, False, timeout)
        _STORE[:] = [store]
    dist.init_process_group("gloo", store=store, rank=place.rank, world_size=place.size,
                            timeout=timeout)
    return TPGroup(tp_size=place.size, tp_rank=place.rank, group=dist.group.WORLD)


def _bind_rendezvous(cfg: WorkerConfig, place: TpPlace) -> str:
    """Rank 0: a TCPStore on a free port (kept for the group's life); its address."""
    import torch.distributed as dist

    store = dist.TCPStore("0.0.0.0", 0, place.size, True,
                          timedelta(seconds=cfg.heartbeat_timeout_s * 4),
                          wait_for_workers=False)
    _STORE[:] = [store]
    return f"tcp://{rendezvous_host(cfg)}:{store.port}"


def rendezvous_host(cfg: WorkerConfig) -> str:
    """Where the other ranks reach this worker: the launch's rendezvous host, else the host
    of its KV endpoint, else this host's name (``EXEGPT_TP_HOST`` overrides)."""
    forced = os.environ.get("EXEGPT_TP_HOST")
    if forced:
        return forced
    for endpoint in (cfg.tp_init, cfg.kv_advertise, cfg.kv_bind):
        if endpoint and endpoint.startswith("tcp://"):
            host = urlsplit(endpoint).hostname
            if host and host not in ("*", "0.0.0.0"):
                return host
    if cfg.coordinator.startswith("ipc://"):  # every process of this mesh is on this host
        return "127.0.0.1"
    return socket.gethostname()


def tp_stage_backend(cfg: WorkerConfig, assign: P.Assign, tp: Any) -> Any:
    """A TP rank's stage from the host-memory weights (its shard: ``HostWeights.get``)."""
    from common.backend_stage_tp import TPStageBackend
    from common.weightstore import spec_from_host
    from common.workermain import check_same_model
    from decoder_worker.pipeline import _range, pipeline_place

    assert cfg.model is not None
    stage, num_stages = pipeline_place(cfg, assign)
    spec = spec_from_host(cfg.model)[0]
    check_same_model(spec.config, assign)
    backend = TPStageBackend(spec, tp, _range(assign.layer_range),
                             _range(assign.encoder_layer_range), cfg.dtype, cfg.device,
                             encoder_out_onward=stage + 2 < num_stages)
    if (backend.is_first, backend.is_last) != (stage == 0, stage == num_stages - 1):
        raise ValueError(f"stage {stage} of {num_stages} got layer_range {assign.layer_range}, "
                         "which does not match its place in the pipeline")
    backend.stage_index = stage
    return backend
