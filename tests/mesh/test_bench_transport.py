"""`exegpt bench transport` runs end to end (tiny sizes: a smoke test, not a measurement)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.cli import main as cli_main
from coordinator.commands.bench_transport import MODES, _plan


def test_plan_interleaves_modes_after_a_warmup() -> None:
    cells = _plan([1 << 20], repeats=2, per_repeat=8 << 20)
    assert [c.mode for c in cells] == list(MODES) * 3
    assert [c.warmup for c in cells] == [True] * 3 + [False] * 6
    assert all(c.count == 8 for c in cells if not c.warmup)


@pytest.mark.parametrize(
    ("sockets", "transports"),
    [("dealer-router", "tcp"),
     pytest.param("push-pull", "ipc,tcp", marks=pytest.mark.slow)],
)
def test_bench_runs_between_two_processes(tmp_path: Path, sockets: str, transports: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    code = cli_main(["bench", "transport", "--sizes-mib", "0.25", "--repeats", "2",
                     "--bytes-per-repeat-mib", "2", "--transport", transports,
                     "--sockets", sockets, "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "hardware: cpu=" in text and "proto/raw" in text and "CPU time per message" in text
    report = json.loads(out.read_text())
    assert [r["transport"] for r in report["rows"]] == transports.split(",")
    for row in report["rows"]:
        for mode in (*MODES, "memcpy"):
            assert row[mode] > 0
        assert 0 < row["protocol_vs_raw"] < 100
    assert "In-process CPU per KV handoff message" in text
    assert {r["regime"] for r in report["in_process"]} == {"hot", "cold"}
    assert all(r[f"{s}_us"] > 0 for r in report["in_process"]
               for s in ("build", "encode", "decode", "copy", "raw_copy"))


def test_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["bench", "transport", "--transport", "udp"]) == 2
    assert cli_main(["bench", "transport", "--sizes-mib", "x"]) == 2
    assert cli_main(["bench", "transport", "--repeats", "0"]) == 2
    assert "exegpt bench transport:" in capsys.readouterr().err
