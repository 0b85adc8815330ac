"""A worker process's life around its compute loop: logs, signals, handshake, cleanup."""

from __future__ import annotations

import gc
import importlib
import os
import queue
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from common import protocol as P
from common.models.config import ModelConfig
from common.workerconfig import WorkerConfig
from common.workerlink import Stop, WorkerLink


class Terminated(Exception):
    """Raised in the main thread by SIGTERM/SIGINT: stop now, closing sockets on the way."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signal.Signals(signum).name)


def run_worker(cfg: WorkerConfig, make_loop: Callable[[WorkerLink, P.Assign, Any], Any]) -> int:
    """A worker process's life: logs, HELLO/Assign, backend setup, READY, the loop, cleanup.

    ``make_loop(link, assign, log)`` builds the backend and the compute loop (it may take long:
    weights load here); its ``run()`` returns the exit code.
    """
    log = setup_worker_logs(cfg)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _raise_terminated)
    link = WorkerLink(cfg, log)
    try:
        assign = link.start()
        log.info("assigned", assigned_role=assign.role, peers=len(assign.peers))
        loop = make_loop(link, assign, log)
        # Startup (imports, weights) leaves a full collection pending that would otherwise
        # land in the first requests (0.3-0.5 s measured); do it now and exempt what is left.
        gc.collect()
        gc.freeze()
        link.ready({"pid": os.getpid(), "backend": cfg.backend})
        log.info("ready", kv_endpoint=link.kv_endpoint)
        code = int(loop.run())
        role = cfg.role
        while getattr(loop, "switch_to", None) is not None:  # a live role switch / re-group
            if "tp" in loop.switch_to.config:  # a TP re-group (decoder_worker.regroup)
                regroup = importlib.import_module("decoder_worker.regroup").regroup
                cfg, loop = regroup(cfg, link, loop.switch_to, log)
                code = int(loop.run())
                continue
            from common.roleswitch import switch_role

            log.info("role_switch", old_role=role, new_role=loop.switch_to.role)
            role = loop.switch_to.role
            loop = switch_role(cfg, link, loop.switch_to, log)
            code = int(loop.run())
        log.info("exit", code=code, **loop.load())
        return code
    except Terminated as exc:
        log.info("terminated", signal=str(exc))
        return 0
    except (TimeoutError, ValueError, OSError) as exc:
        log.error("failed", error=str(exc))
        link.goodbye(str(exc))
        print(f"{cfg.role} worker {cfg.worker_id}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # e.g. a TP collective whose peer rank died: say so, then exit
        log.exception("failed", error=f"{type(exc).__name__}: {exc}")
        told = link.goodbye(f"{type(exc).__name__}: {exc}")  # its group is dropped at once
        print(f"{cfg.role} worker {cfg.worker_id} failed (coordinator told: {told}): "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        link.close()


def setup_worker_logs(cfg: WorkerConfig) -> Any:
    """JSON lines in ``runs/<run-id>/<role>-<worker_id>.jsonl`` (run id from the launcher)."""
    from common.logs import get_logger, setup_logging

    setup_logging(cfg.role, cfg.worker_id, tp_rank=cfg.tp_rank)
    return get_logger()


class FollowerLoop:
    """TP ranks > 0 of a worker group (encoder or decoder): no mesh data traffic (the link
    still heartbeats), just mirror rank 0 through the group's gloo broadcasts. A pipeline
    stage's follower whose rank 0 leaves for a live re-group (REGROUP) takes its next Assign
    from the link (``switch_to``: decoder_worker.regroup builds its new place)."""

    def __init__(self, backend: Any, link: WorkerLink | None = None, log: Any = None) -> None:
        self.backend, self.link, self.log = backend, link, log
        self.switch_to: P.Assign | None = None

    def load(self) -> dict[str, Any]:
        return {"follower": True}

    def run(self) -> int:
        code = int(self.backend.follow())
        if code >= 0:
            return code
        if self.link is None:  # REGROUP without a link to hear the new place from
            raise ValueError("rank 0 left the TP group for a re-group; this rank cannot follow")
        return self._await_assign()

    def _await_assign(self) -> int:
        """The re-group's Assign (the coordinator sent it with rank 0's, or after rank 0's
        rendezvous); a Shutdown / Stop meanwhile ends the worker."""
        assert self.link is not None
        deadline = time.monotonic() + self.link.cfg.startup_timeout_s
        while time.monotonic() < deadline:
            try:
                msg = self.link.inbox.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if isinstance(msg, P.Assign) and "tp" in msg.config:
                self.switch_to = msg
                return 0
            if (code := stop_code(msg, self.log)) is not None:
                return code
        raise TimeoutError("left the TP group for a re-group, but no Assign came within "
                           f"{self.link.cfg.startup_timeout_s:.0f} s")


def check_same_model(mine: ModelConfig, assign: P.Assign) -> None:
    """The worker's weights must be the model the coordinator validates requests against."""
    theirs = ModelConfig.from_dict(assign.config["model"])
    if mine.to_dict() != theirs.to_dict():
        raise ValueError(f"this worker loaded {mine.family} (vocab {mine.vocab_size}, "
                         f"{mine.num_layers} layers) but the coordinator serves "
                         f"{theirs.family} (vocab {theirs.vocab_size}, {theirs.num_layers} "
                         "layers); start both with the same --model")


def stop_code(msg: object, log: Any) -> int | None:
    """The exit code a Shutdown (0) or the link's Stop (1 on error) asks for; None otherwise."""
    if isinstance(msg, P.Shutdown):
        log.info("shutdown", reason=msg.reason)
        return 0
    if isinstance(msg, Stop):
        if msg.error:
            log.error("stopping", reason=msg.reason)
        return 1 if msg.error else 0
    return None
