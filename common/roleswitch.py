"""A worker's live role switch (encoder <-> decoder) inside one process (docs/adaptation.md).

An adapting coordinator may move a whole-model WAA worker to the other role when a new plan
wants another encoder/decoder split::

    coordinator: drain the worker (no new work; its in-flight requests finish, or are
                 migrated: re-run from prompt + streamed tokens under a new wire id)
             --> Assign(role=new, config["role_switch"]=epoch) on the ordered pipe
    worker:  the loop returns with ``switch_to`` (a decoder frees its sequences first),
             its backend is closed; the new role's backend is built (weights from host
             memory, common.weightstore) and its loop started
             --> Ready(info={"role_switch": epoch, "reload_s": ...})

The process keeps its link (sockets, id, heartbeats): a worker that may become a decoder was
started with a KV endpoint (``--kv-bind``). The roles' loops are found by module name, so the
role packages still never import each other.

A staged WAA stage worker's live re-layout (coordinator.relayout.WaaRelayout) takes the same
path: its loop returns with the re-Assign (``config["relayout"]`` = epoch; the stage's side,
index, layer range and KV routes), ``relayout_stage`` builds the new stage's loop from host
memory --> Ready(info={"relayout": epoch, "reload_s": ...}).
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import os
import time
from typing import Any

from common import protocol as P
from common.workerconfig import WorkerConfig
from common.workerlink import WorkerLink

SWITCHABLE = ("encoder", "decoder")


def role_config(cfg: WorkerConfig, assign: P.Assign) -> WorkerConfig:
    """The worker's settings in its new role (the Assign may carry the role's capacity)."""
    if assign.role not in SWITCHABLE:
        raise ValueError(f"a live role switch goes to {SWITCHABLE}, not {assign.role!r}")
    capacity = assign.config.get("capacity", cfg.capacity)
    if type(capacity) is not int or capacity < 1:
        raise ValueError(f"role switch: bad capacity {capacity!r}")
    return dataclasses.replace(cfg, role=assign.role, capacity=capacity)


def switch_role(cfg: WorkerConfig, link: WorkerLink, assign: P.Assign, log: Any) -> Any:
    """Build the new role's loop and say Ready with the rebuild time; returns the loop."""
    if "relayout" in assign.config:
        return relayout_stage(cfg, link, assign, log)
    start = time.perf_counter()
    new_cfg = role_config(cfg, assign)
    gc.unfreeze()  # the old role's backend is garbage now
    gc.collect()
    module = importlib.import_module(f"{assign.role}_worker.worker")
    loop = module.make_loop(new_cfg, link, assign, log)
    gc.collect()
    gc.freeze()
    reload_s = time.perf_counter() - start
    link.ready({"pid": os.getpid(), "backend": cfg.backend, "role": assign.role,
                "role_switch": assign.config.get("role_switch"), "reload_s": reload_s})
    log.info("role_switched", new_role=assign.role, epoch=assign.config.get("role_switch"),
             reload_s=round(reload_s, 4), capacity=new_cfg.capacity)
    return loop


def relayout_stage(cfg: WorkerConfig, link: WorkerLink, assign: P.Assign, log: Any) -> Any:
    """A staged WAA stage's new loop (another side / range); Ready with the rebuild time."""
    start = time.perf_counter()
    epoch = assign.config.get("relayout")
    gc.unfreeze()  # the old stage's backend (and its KV) is garbage now
    gc.collect()
    module = importlib.import_module("decoder_worker.waa_stage")
    loop = module.build_waa_loop(cfg, link, assign, log)
    gc.collect()
    gc.freeze()
    reload_s = round(time.perf_counter() - start, 4)
    waa = assign.config["pipeline"]["waa"]
    log.info("relayout", epoch=epoch, side=waa["side"], index=waa["index"],
             layer_range=assign.layer_range, reload_s=reload_s)
    link.ready({"pid": os.getpid(), "backend": cfg.backend, "relayout": epoch,
                "reload_s": reload_s})
    return loop
