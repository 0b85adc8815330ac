"""Encoder-bound WAA on a compute-bound device: the closed form's burst timeline against the DES.

On a CPU a decode step's cost grows almost in proportion to its batch, so the decoders' batch
right after an encoded batch merges (B_E sequences at once) matters, not its time average:
the steady closed form this replaced read the time per token 2.7-5x and the p99-length
latency 20-28% short of the discrete-event simulator on SmolLM2's measured profile.
"""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.planner.candidate import Candidate
from coordinator.planner.costs import Costs
from coordinator.planner.des import run_des
from coordinator.planner.simulator import simulate
from coordinator.planner.waa_burst import RoundTable, burst_timeline
from coordinator.planner.workload import parse_workload

S4 = "in=normal:64,63,128;out=normal:32,13,80;name=S/4"


@pytest.mark.parametrize(("b_e", "workload", "rel"), [
    (8, S4, 0.08), (32, S4, 0.05),
    # fixed prompt lengths: every encoder period the same, as the timeline assumes (the
    # DES's p99-length figure at B_E = 1 rests on ~40 requests: +-4% between seeds); with
    # S/4's spread of prompts at B_E <= 4 the DES reads 4-11% longer (irregular arrivals
    # bunch up), which is left as a known gap (docs/planner.md)
    (1, "in=normal:64,2,128;out=normal:32,13,80;name=fixed-in", 0.08)])
def test_encoder_bound_waa_agrees_with_des(b_e: int, workload: str, rel: float,
                                           cpu_roofline_costs: Costs) -> None:
    wl = parse_workload(workload)
    cand = Candidate("waa-c", 2, B_E=b_e)
    closed = simulate(cand, wl, cpu_roofline_costs)
    ex = closed.extra
    assert ex["encode_period_s"] > ex["round_s"]  # the case under test: encoder-bound
    des = run_des(cand, wl, cpu_roofline_costs, num_requests=4000, seed=3).metrics
    assert closed.throughput_seq_s == pytest.approx(des.throughput_seq_s, rel=0.03)
    assert closed.latency_p99len_s == pytest.approx(des.latency_p99len_s, rel=rel)
    assert closed.tpot_s == pytest.approx(des.tpot_s, rel=0.1)
    assert closed.B_D == pytest.approx(des.B_D, rel=0.12)
    # the decoders must hold a whole merged batch at once: what the mesh's capacity is sized by
    assert ex["peak_decode_batch"] >= 0.95 * b_e
    # the decoder idles between a burst's tail and the next merge (was read as 100% busy)
    assert closed.worker_util[-1] == pytest.approx(des.worker_util[-1], abs=0.06)


def test_burst_timeline_of_a_linear_round() -> None:
    """One sequence per cohort that lives exactly 3 steps, rounds of 1 s, a cohort every 10 s:
    no overlap, so the p99-length request's tokens come 1, 2, 3 s after it is ready."""
    surv = np.array([1.0, 1.0, 1.0])
    table = RoundTable(lambda b: np.where(b > 0, 1.0, 0.0), 1.0)
    burst = burst_timeline(1.0, 10.0, surv, table, s99=3)
    assert burst.to_token == pytest.approx([1.0, 2.0, 3.0])
    assert burst.to_p99 == pytest.approx(3.0)
    assert burst.mean_batch == pytest.approx(1.0, rel=0.05)
    assert burst.busy == pytest.approx(0.3, rel=0.1)
    with pytest.raises(ValueError, match="positive"):
        burst_timeline(1.0, 0.0, surv, table, s99=3)
