"""A short soak (tests/mesh/soak.py) as a slow test: every role killed and restarted at least
once under steady clients; nothing lost, duplicated or wrong, every kill recovered from."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.mesh.soak import soak


@pytest.mark.slow
@pytest.mark.parametrize("policy, seconds", [("waa", 150.0), ("rra", 70.0)])
def test_a_short_soak_loses_nothing(tmp_path: Path, policy: str, seconds: float) -> None:
    report = asyncio.run(soak(policy, seconds, every=20.0, clients=4, restart_after=1.0,
                              runs=tmp_path))
    assert report["lost"] == 0 and report["duplicated_tokens"] == 0
    assert report["wrong_tokens"] == 0 and report["completed"] > 0
    roles = {k["role"] for k in report["kills"]}
    assert roles == ({"encoder", "decoder", "tp_rank", "coordinator"} if policy == "waa"
                     else {"pipeline_stage", "coordinator"})
    assert all(k["ready_s"] is not None and k["first_ok_s"] is not None
               for k in report["kills"]), report["kills"]
