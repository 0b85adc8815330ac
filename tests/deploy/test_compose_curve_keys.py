"""`exegpt compose --curve-workers` refuses a keys directory with fewer worker key pairs than
worker services (Docker would mount empty directories in their place) and names the
`exegpt keys` command that completes it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from coordinator.cli import main
from coordinator.commands.keys import write_keys


def _compose(plan: Path, out: Path, curve_dir: str) -> int:
    return main(["compose", "--plan", str(plan), "--out", str(out), "--null-model",
                 "--curve-dir", curve_dir, "--curve-workers"])


def _workers(out: Path) -> int:
    """Worker services in a written compose file (every one has its own key mount)."""
    return out.read_text().count("/keys/worker.key_secret:ro")


def test_too_few_worker_keys_is_refused_with_the_command_to_run(
        tmp_path: Path, plan_file: Any, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    _, plan = plan_file("waa", 3)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "docker-compose.yml"
    write_keys(tmp_path / "keys", 1, 1)  # one worker pair: too few for the plan's services
    assert _compose(plan, out, "keys") == 2
    err = capsys.readouterr().err
    assert not out.exists()  # nothing written
    assert "has 1 of them" in err and "workers/worker-1.key_secret" in err
    wanted = int(err.split("--curve-workers: ")[1].split()[0])
    assert wanted >= 2 and f"`exegpt keys --dir keys --workers {wanted}`" in err
    write_keys(tmp_path / "keys", 1, wanted)  # what the message says to run
    assert _compose(plan, out, "keys") == 0
    assert _workers(out) == wanted


def test_no_worker_keys_at_all_names_the_keys_dir_as_docker_sees_it(
        tmp_path: Path, plan_file: Any, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    _, plan = plan_file("waa", 2)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the mount resolves against --out's directory
    write_keys(tmp_path / "keys", 1, 0)  # `exegpt keys` without --workers: no mesh pair either
    assert _compose(plan, tmp_path / "docker-compose.yml", "keys") == 2
    err = capsys.readouterr().err
    assert "has 0 of them" in err and "mesh.key_secret" in err
    assert f"`exegpt keys --dir {tmp_path / 'keys'} --workers " in err
