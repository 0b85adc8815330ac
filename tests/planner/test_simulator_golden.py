"""The optimised closed form returns exactly the metrics of the pre-optimisation simulator.

``data/simulator_golden.json`` was written by the simulator before the performance work (caches,
de-duplicated stages, memoised WAA splits) from the candidates ``golden_cases()`` lists;
regenerate it only for an intended change of the model: ``python tests/planner/
test_simulator_golden.py --write``. Regenerated once (issue 6) for the RRA encode round's
pipeline fill and the static streams' drift term: the 128 multi-stage RRA and 36 static
candidates changed (slower: RRA throughput x0.57-0.97), the 16 single-stage RRA, 36
continuous and 192 WAA candidates are bit for bit what the pre-optimisation simulator wrote.
Regenerated again (issue 6, continuous closed form): the 36 continuous candidates changed
(throughput x0.42-x1.95, median x1.06; p99-length latency x0.51-x2.41), because the
iteration now charges Binomial(B, 1/E[S]) whole prefills and the round the longest traverse
or busiest stage of the P streams' passes, which the stage-level DES confirms (test_des.py);
the 144 RRA, 36 static and 192 WAA candidates are unchanged bit for bit (also with the new
fixed per-pass overhead term, which is 0 for analytic profiles). Regenerated a third time
(issue 6, encoder-bound WAA): the decoders' batch is now a burst timeline
(coordinator/planner/waa_burst.py), which the DES confirms where the steady batch was 20-28%
short on a CPU profile; 35 encoder-bound WAA candidates changed (p99-length latency
x0.99-x1.22, throughput unchanged; memory now at the peak batch and the encoder's in-flight
batches counted per encoder period), every WAA candidate gained ``peak_decode_batch`` in its
extra, and the RRA, static and continuous candidates are unchanged bit for bit. A fourth
time: an encoder-bound WAA decoder's utilisation is now its busy fraction on the burst
timeline times its stage's share of the round (it was read as always busy; the DES agrees,
test_waa_burst.py): 5 candidates' ``util`` changed, nothing else. A fifth time: a static
batch diminishes (the runner decodes only its live rows, coordinator/streams.py, and the DES
now does too), and its time per token is each request's own: the 36 static candidates changed
(throughput x1.00-x1.98, median x1.04; SLA-(b) latency x0.46-x1.00), nothing else. A sixth
time: an RRA stream is alive at a cycle offset with the exact P(any of its rows is), not a
Poisson guess, and the P lock-stepped streams' round is a Binomial mix of 1..P live streams
(a round of one live stream costs its whole traverse; ``costs.lockstep_round``): 38 of the
144 RRA candidates changed (throughput x0.992-x1.000, p99-length latency within 0.05%),
nothing else. Floats
round-trip through JSON exactly (repr), so the comparison is for equality, not a tolerance.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from common.models.config import ModelConfig
from coordinator.planner.analytic import analytic_profile
from coordinator.planner.candidate import Candidate, Metrics, WorkloadStats
from coordinator.planner.costs import Costs
from coordinator.planner.rra_table import (
    alive_probability,
    cycle_log_empty,
    cycle_sums,
    decode_parts,
    step_batches,
)
from coordinator.planner.simulator import simulate
from coordinator.planner.workload import preset

GOLDEN = Path(__file__).parent / "data" / "simulator_golden.json"
CLUSTERS = {"opt-13b": ("a40", 4), "t5-11b": ("a40", 8), "gpt3-175b": ("a100", 16)}


def golden_cases() -> list[tuple[str, str, Candidate]]:
    """(model, task, candidate): every policy, TP degree, partial TP, small/large knobs."""
    cases = []
    for model, (_, n) in CLUSTERS.items():
        for task in ("S", "T", "G", "C2"):
            for b_e, n_d in ((1, 1), (8, 7), (64, 40), (256, 128)):
                cases.append((model, task, Candidate("rra", n, 1, 0, b_e, n_d)))
                cases.append((model, task, Candidate("rra", n, 2, n // 2, b_e, n_d)))
                cases.append((model, task, Candidate("rra", n, 4, n, b_e, n_d)))
            for b_e, b_m in ((1, 1), (6, 2), (40, 3), (200, 1)):
                for pol in ("waa-c", "waa-m"):
                    cases.append((model, task, Candidate(pol, n, 1, 0, b_e, 1, b_m)))
                    cases.append((model, task, Candidate(pol, n, 2, 2, b_e, 1, b_m)))
            for b in (1, 16, 128):
                cases.append((model, task, Candidate("static", n, 2, 2, b)))
                cases.append((model, task, Candidate("continuous", n, 1, 0, b)))
    return cases


def metrics_dict(m: Metrics) -> dict[str, Any]:
    pipes = {k: [[st.tp, list(st.enc_layers), list(st.dec_layers), st.first, st.last]
                 for st in v] for k, v in m.pipelines.items()}
    return {"feasible": m.feasible, "reason": m.reason,
            "values": [_num(x) for x in (m.throughput_seq_s, m.throughput_tok_s,
                                         m.latency_p99len_s, m.latency_p99_s, m.ttft_s, m.tpot_s,
                                         m.B_D, m.mem_capacity_bytes)],
            "util": [_num(x) for x in m.worker_util], "mem": [_num(x) for x in m.worker_mem_bytes],
            "pipelines": pipes, "extra": {k: _num(v) for k, v in sorted(m.extra.items())}}


def _num(x: float) -> float | str:
    x = float(x)
    return x if math.isfinite(x) else repr(x)


def compute_all() -> list[dict[str, Any]]:
    costs = {m: Costs(analytic_profile(g, ModelConfig.preset(m))) for m, (g, _) in
             CLUSTERS.items()}
    stats = {t: WorkloadStats(preset(t)) for t in ("S", "T", "G", "C2")}
    return [{"case": [model, task, repr(c)], **metrics_dict(simulate(c, stats[task], costs[model]))}
            for model, task, c in golden_cases()]


def test_simulator_matches_the_pre_optimisation_golden_metrics() -> None:
    want = json.loads(GOLDEN.read_text())
    got = compute_all()
    assert len(got) == len(want) > 300
    mismatches = [(w["case"], w, g) for w, g in zip(want, got, strict=True) if w != g]
    assert not mismatches, f"{len(mismatches)} candidates differ; first: {mismatches[0]}"


def test_block_tables_equal_costing_each_candidate_alone() -> None:
    """A row of a B_E-block table is bit-identical to costing that B_E's cycle by itself, for
    grid and off-grid B_E, at every TP degree and both step-batch rules."""
    costs = Costs(analytic_profile("a40", ModelConfig.preset("opt-13b")))
    stats = WorkloadStats(preset("G"))
    for n_d in (1, 13, 200):
        sums, ctx = cycle_sums(stats, n_d)
        for b_e in (1, 7, 17, 64, 300, 512):
            for alive in (True, False):
                q = alive_probability(b_e, cycle_log_empty(stats, n_d)) if alive else None
                batch = step_batches(b_e * sums, q)
                layers, ops = decode_parts(costs, stats, {1, 2, 4}, n_d, b_e, alive)
                for tp in (1, 2, 4):
                    assert np.array_equal(layers[tp], costs._decode_layer(tp, batch, ctx))
                    for name in ("embed", "lm_head"):
                        assert np.array_equal(ops[name, tp], costs.profile.op(name, tp, batch))
                assert np.array_equal(ops["stage_send", 1], costs.profile.op(
                    "stage_send", 1, batch * costs.hidden_bytes))


if __name__ == "__main__" and "--write" in sys.argv:
    GOLDEN.write_text(json.dumps(compute_all(), indent=0) + "\n")
