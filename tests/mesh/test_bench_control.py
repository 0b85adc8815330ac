"""`exegpt bench control` runs end to end (tiny numbers; the real benchmark is the command)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_control_reports_rates_and_the_cpu_split() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "bench", "control", "--streams", "8",
         "--tokens", "40", "--repeats", "1", "--model-shape", "tiny-llama"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if "repeat 1" in ln)
    assert "320 tokens" in line  # 8 streams x 40 tokens, every one received
    assert re.search(r"CPU us/token: coordinator [\d.]+, encoder-enc0 [\d.]+, decoder-dec0", line)
    assert re.search(r"median: [\d,]+ tokens/s", out.stdout)
