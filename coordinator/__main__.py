"""``python -m coordinator``: the coordinator alone, configured by flags or EXEGPT_* env."""

from __future__ import annotations

import argparse
import sys

from common.procs import write_status
from coordinator import config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m coordinator",
        description="The exegpt coordinator: takes client requests, batches them onto encoder "
                    "workers, relays decoder tokens back to clients.")
    config.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = config.from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    import uvloop

    from common.logs import get_logger, setup_logging
    from coordinator.server import serve

    setup_logging("coordinator")  # runs/<EXEGPT_RUN_ID>/coordinator.jsonl + stderr
    log = get_logger()
    try:
        return uvloop.run(serve(cfg, log))
    except (OSError, ValueError) as exc:
        write_status(cfg.ready_fd, "failed", error=str(exc))
        print(f"coordinator: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
