"""The planner is pure Python + numpy: importing it and planning must not load torch."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
import coordinator.planner as planner
from coordinator.planner.analytic import analytic_profile
from coordinator.planner.des import run_des
from coordinator.planner.candidate import Candidate
from coordinator.planner.costs import Costs
from common.models.config import ModelConfig
prof = analytic_profile("a40", ModelConfig.preset("opt-13b"))
plan = planner.make_plan(planner.preset("S"), prof, 4, 6.0)
run_des(Candidate("rra", 4, B_E=8, N_D=8), planner.preset("S"), Costs(prof), num_requests=500)
assert plan.policy
print("torch" in sys.modules)
"""


def test_planning_does_not_import_torch() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         check=True, timeout=300)
    assert out.stdout.strip() == "False"
