"""``python -m decoder_worker``: one decoder worker, configured by flags or EXEGPT_* env."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from common import protocol as P
from common import workerconfig
from common.workerlink import WorkerLink
from common.workermain import FollowerLoop, run_worker
from decoder_worker.worker import DecoderLoop, build_backend


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m decoder_worker",
        description="An exegpt decoder worker: binds a KV endpoint for encoders, runs decode "
                    "iterations and streams tokens to the coordinator.")
    workerconfig.add_arguments(parser, "decoder")
    args = parser.parse_args(argv)
    try:
        cfg = workerconfig.from_args(args, "decoder")
    except ValueError as exc:
        parser.error(str(exc))

    def make_loop(link: WorkerLink, assign: P.Assign, log: Any) -> DecoderLoop | FollowerLoop:
        backend = build_backend(cfg, assign)
        if cfg.tp_rank > 0 and cfg.backend == "engine":
            return FollowerLoop(backend)  # rank 0 of its TP group carries the data
        return DecoderLoop(cfg, link, backend, log)

    return run_worker(cfg, make_loop)


if __name__ == "__main__":
    sys.exit(main())
