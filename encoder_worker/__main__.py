"""``python -m encoder_worker``: one encoder worker, configured by flags or EXEGPT_* env."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from common import protocol as P
from common import workerconfig
from common.workerlink import WorkerLink
from common.workermain import FollowerLoop, run_worker
from encoder_worker.worker import EncoderLoop
from encoder_worker.worker import make_loop as make_role_loop


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
        return make_role_loop(cfg, link, assign, log)

    return run_worker(cfg, make_loop)


if __name__ == "__main__":
    sys.exit(main())
