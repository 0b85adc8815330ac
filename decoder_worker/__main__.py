"""``python -m decoder_worker``: one decoder worker (``--role decoder``, the default) or one
pipeline stage worker (``--role pipeline --stage S``), configured by flags or EXEGPT_* env."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from common import protocol as P
from common import workerconfig
from common.workerlink import WorkerLink
from common.workermain import FollowerLoop, run_worker

ROLES = ("decoder", "pipeline")
DESCRIPTIONS = {
    "decoder": "An exegpt decoder worker: binds a KV endpoint for encoders, runs decode "
               "iterations and streams tokens to the coordinator.",
    "pipeline": "An exegpt pipeline stage worker (RRA, static, continuous plans, and the "
                "encoder / decoder stages of a WAA plan with layer ranges): holds one "
                "layer range, takes StagePasses from the coordinator or the previous stage at "
                "its KV endpoint, hands hidden rows to the next stage; the last stage samples "
                "and reports PassDone to the coordinator.",
}


def _role(argv: list[str] | None) -> str:
    """--role picks which flags the parser has, so it is read first."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--role", choices=ROLES, default=os.environ.get("EXEGPT_ROLE", "decoder"))
    known, _ = pre.parse_known_args(argv)
    return known.role


def build_parser(role: str) -> argparse.ArgumentParser:
    """The flags of ``role`` (`exegpt compose` checks the commands it writes against them)."""
    parser = argparse.ArgumentParser(prog="python -m decoder_worker",
                                     description=DESCRIPTIONS[role])
    parser.add_argument("--role", choices=ROLES, default=role,
                        help="decoder (WAA plans) or pipeline (a stage of an RRA, static or "
                             "continuous plan); default from EXEGPT_ROLE, else decoder")
    workerconfig.add_arguments(parser, role)
    return parser


def main(argv: list[str] | None = None) -> int:
    role = _role(argv)
    parser = build_parser(role)
    args = parser.parse_args(argv)
    try:
        cfg = workerconfig.from_args(args, role)
    except ValueError as exc:
        parser.error(str(exc))

    def make_loop(link: WorkerLink, assign: P.Assign, log: Any) -> Any:
        if role == "pipeline":
            from decoder_worker.pipeline import StageLoop, build_stage_backend
            from decoder_worker.waa_stage import build_waa_loop, waa_place

            if waa_place(assign) is not None:  # a stage of a staged WAA plan
                return build_waa_loop(cfg, link, assign, log)

            stage_backend = build_stage_backend(cfg, assign)
            if cfg.tp_rank > 0 and cfg.backend == "engine":
                return FollowerLoop(stage_backend, link, log)  # rank 0 carries the data
            return StageLoop(cfg, link, stage_backend, log)
        from decoder_worker.worker import make_loop as make_role_loop

        return make_role_loop(cfg, link, assign, log)

    return run_worker(cfg, make_loop)


if __name__ == "__main__":
    sys.exit(main())
