"""``python -m encoder_worker``: one encoder worker, configured by flags or EXEGPT_* env."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from common import protocol as P
from common import workerconfig
from common.workerlink import WorkerLink
from common.workermain import FollowerLoop, run_worker
from encoder_worker.worker import EncoderLoop, build_backend


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m encoder_worker",
        description="An exegpt encoder worker: connects to the coordinator, encodes batches "
                    "and sends each request's KV directly to its decoder.")
    workerconfig.add_arguments(parser, "encoder")
    args = parser.parse_args(argv)
    try:
        cfg = workerconfig.from_args(args, "encoder")
    except ValueError as exc:
        parser.error(str(exc))

    def make_loop(link: WorkerLink, assign: P.Assign, log: Any) -> EncoderLoop | FollowerLoop:
        backend, shape = build_backend(cfg, assign)
        if cfg.tp_rank > 0 and cfg.backend == "engine":
            return FollowerLoop(backend)  # rank 0 of its TP group carries the data
        return EncoderLoop(cfg, link, backend, shape, log)

    return run_worker(cfg, make_loop)


if __name__ == "__main__":
    sys.exit(main())
