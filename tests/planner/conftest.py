"""Shared fixtures: analytic profiles are built once per session (about 10 ms each)."""

from __future__ import annotations

import pytest

from common.models.config import ModelConfig
from coordinator.planner.analytic import analytic_profile
from coordinator.planner.costs import Costs


@pytest.fixture(scope="session")
def a40_opt13b_costs() -> Costs:
    return Costs(analytic_profile("a40", ModelConfig.preset("opt-13b")))


@pytest.fixture(scope="session")
def a40_t5_costs() -> Costs:
    return Costs(analytic_profile("a40", ModelConfig.preset("t5-11b")))
