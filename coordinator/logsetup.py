"""Logging for the coordinator process: common.logs, one JSON-lines file in the run dir."""

from __future__ import annotations

from typing import Any


def setup_coordinator_logs() -> Any:
    from common.logs import get_logger, setup_logging

    setup_logging("coordinator")
    return get_logger()
