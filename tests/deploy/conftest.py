"""Deploy tests: plans made in milliseconds from an analytic profile (no measuring, no torch)."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXEGPT = [sys.executable, "-m", "coordinator.cli"]
CHECK_JSONSCHEMA = Path(sys.executable).with_name("check-jsonschema")
SMALL_WORKLOAD = "in=normal:32,16,64;out=normal:16,8,32"


def make_plan(policy: str, workers: int, model: str = "smollm2-135m") -> object:
    from common.models.config import ModelConfig
    from coordinator.planner import make_plan as plan_for
    from coordinator.planner import parse_workload
    from coordinator.planner.analytic import analytic_profile

    profile = analytic_profile("a40", ModelConfig.preset(model), "bfloat16", (1,))
    return plan_for(parse_workload(SMALL_WORKLOAD), profile, workers, 1e18, policy=policy)


@pytest.fixture
def plan_file(tmp_path: Path) -> Callable[..., tuple[object, Path]]:
    """``plan_file(policy, workers, name)`` -> (Plan, path of its JSON in tmp_path)."""

    def write(policy: str = "waa", workers: int = 3, name: str = "plan.json",
              model: str = "smollm2-135m") -> tuple[object, Path]:
        plan = make_plan(policy, workers, model)
        path = tmp_path / name
        path.write_text(plan.to_json())  # type: ignore[attr-defined]
        return plan, path

    return write


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def free_port() -> Callable[[], int]:
    return _free_port


def _validate_compose(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.compose-spec",
                           *map(str, paths)], capture_output=True, text=True, timeout=60)


@pytest.fixture
def validate_compose() -> Callable[..., subprocess.CompletedProcess[str]]:
    """The real validator with the compose-spec schema it ships (no network)."""
    assert CHECK_JSONSCHEMA.is_file(), f"check-jsonschema missing at {CHECK_JSONSCHEMA}"
    return _validate_compose
