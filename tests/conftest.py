"""Shared test setup: tests run on the CPU with one torch thread per process."""

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def cpu_roofline_profile():  # noqa: ANN201 - a planner Profile
    """SmolLM2-135M on a 2-core CPU as a roofline (60 GFLOP/s bf16, 20 GB/s memory): decode
    is compute-bound, its step cost grows almost in proportion to the batch, as on this
    machine (the planner's CPU-shaped tests: WAA bursts, static batches, elasticities)."""
    from common.models.config import ModelConfig
    from coordinator.planner import analytic
    from coordinator.planner.analytic import GPUSpec, analytic_profile

    spec = GPUSpec("2-core CPU (roofline)", 60e9, 20e9, 24e9, 10e9, 10e9, 10e9, 20e-6,
                   launch_s=20e-6)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(analytic.GPUS, "cpu-like", spec)
        return analytic_profile("cpu-like", ModelConfig.preset("smollm2-135m"), "bfloat16",
                                (1,))


@pytest.fixture(scope="session")
def cpu_roofline_costs(cpu_roofline_profile):  # noqa: ANN001, ANN201 - planner Costs
    from coordinator.planner.costs import Costs

    return Costs(cpu_roofline_profile)
