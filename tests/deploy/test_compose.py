"""docker-compose files: valid per the compose spec, faithful to the plan, flags of this build."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from coordinator.commands._compose_spec import (
    ComposeOptions,
    compose_dict,
    override_dict,
    to_yaml,
    worker_units,
)

ROOT = Path(__file__).resolve().parents[2]
EXEGPT = [sys.executable, "-m", "coordinator.cli"]
LEGACY = {"coordinator": {"--client-endpoint", "--worker-endpoint", "--encoders", "--decoders",
                          "--encode-batch", "--model-shape"},
          "encoder": {"--coordinator", "--worker-id", "--tp-rank", "--tp-size", "--null-model"},
          "decoder": {"--coordinator", "--worker-id", "--tp-rank", "--tp-size", "--null-model",
                      "--kv-bind", "--kv-advertise"}}


def _compose(plan_path: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EXEGPT, "compose", "--plan", str(plan_path), "--out", str(out),
                           *extra], capture_output=True, text=True, timeout=60, cwd=out.parent)


def test_top_level_compose_file_is_valid(validate_compose) -> None:  # noqa: ANN001
    done = validate_compose(ROOT / "docker-compose.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert "coordinator" in data["services"]
    assert data["services"]["coordinator"]["ports"] == ["5555:5555"]


def test_validator_rejects_a_broken_file(tmp_path: Path, validate_compose) -> None:  # noqa: ANN001
    bad = tmp_path / "docker-compose.yml"
    bad.write_text("services:\n  coordinator:\n    ports: 5555\n    restart: sometimes\n")
    assert validate_compose(bad).returncode != 0


def test_generated_file_and_override_are_valid(tmp_path: Path, plan_file,  # noqa: ANN001
                                               validate_compose) -> None:  # noqa: ANN001
    _, base_plan = plan_file("rra", 3, "base.json")
    _, new_plan = plan_file("waa", 3, "new.json")
    done = _compose(base_plan, tmp_path / "docker-compose.yml", "--null-model")
    assert done.returncode == 0, done.stderr
    done = _compose(new_plan, tmp_path / "docker-compose.override.yml", "--null-model")
    assert done.returncode == 0, done.stderr
    assert "override of" in done.stdout
    result = validate_compose(tmp_path / "docker-compose.yml",
                              tmp_path / "docker-compose.override.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    base = yaml.safe_load((tmp_path / "docker-compose.yml").read_text())["services"]
    over = yaml.safe_load((tmp_path / "docker-compose.override.yml").read_text())["services"]
    # RRA on 3 workers without plan support: 3 encoders + 3 decoders; WAA: enc0, enc1, dec0
    assert set(base) - set(over) == set()
    assert {n for n, s in over.items() if s.get("profiles") == ["exegpt-unused"]} == \
        {"enc2", "dec1", "dec2"}


def test_services_follow_the_plan(plan_file) -> None:  # noqa: ANN001
    plan, _ = plan_file("waa", 3)
    data = compose_dict(plan, ComposeOptions(null_model=True), LEGACY)
    units = worker_units(plan, plan_mode=False)
    assert set(data["services"]) == {"coordinator", *(u.service for u in units)}
    coord = data["services"]["coordinator"]["command"]
    num_enc = sum(g.count for g in plan.groups("encoder"))
    num_dec = sum(g.count for g in plan.groups("decoder"))
    assert coord[coord.index("--encoders") + 1] == str(num_enc)
    assert coord[coord.index("--decoders") + 1] == str(num_dec)
    assert coord[coord.index("--encode-batch") + 1] == str(plan.B_E)
    for name, svc in data["services"].items():
        if name.startswith("dec"):
            cmd = svc["command"]
            assert cmd[cmd.index("--kv-advertise") + 1] == f"tcp://{name}:6000"
            assert cmd[cmd.index("--coordinator") + 1] == "tcp://coordinator:5556"


def test_tp_groups_become_one_service_per_rank(plan_file) -> None:  # noqa: ANN001
    from coordinator.planner.plan import WorkerGroup

    plan, _ = plan_file("waa", 3)
    plan = replace(plan, num_workers=4, worker_groups=(
        WorkerGroup("encoder", 2, 2, (0, 30)), WorkerGroup("decoder", 2, 2, (0, 30))))
    units = worker_units(plan, plan_mode=True)
    assert [(u.service, u.worker_id, u.tp_rank, u.tp_size) for u in units] == [
        ("enc0-r0", "enc0.r0", 0, 2), ("enc0-r1", "enc0.r1", 1, 2),
        ("dec0-r0", "dec0.r0", 0, 2), ("dec0-r1", "dec0.r1", 1, 2)]


def test_real_model_needs_a_build_that_loads_models(plan_file) -> None:  # noqa: ANN001
    plan, _ = plan_file("waa", 3)
    with pytest.raises(ValueError, match="--null-model"):
        compose_dict(plan, ComposeOptions(), LEGACY)
    two, _ = plan_file("waa", 2, "two.json")  # one encoder + one decoder: no --plan needed
    flags = {"coordinator": LEGACY["coordinator"] | {"--model-config", "--tokenizer"},
             "encoder": LEGACY["encoder"] | {"--model", "--dtype"},
             "decoder": LEGACY["decoder"] | {"--model", "--dtype"}}
    data = compose_dict(two, ComposeOptions(), flags)
    coord = data["services"]["coordinator"]
    gguf = "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert coord["command"][-4:] == ["--model-config", gguf + ".config.json", "--tokenizer", gguf]
    assert "--model-shape" not in coord["command"]  # the exact config, not a look-alike preset
    assert "./models:/models:ro" in coord["volumes"]
    assert data["services"]["enc0"]["command"][-4:] == ["--model", gguf, "--dtype", "bfloat16"]
    # layer-split stages: refused by this build's plan_launch (or, without it, by compose)
    with pytest.raises(ValueError, match="one encoder group plus one decoder group|"
                                         "not available in this build"):
        compose_dict(plan, ComposeOptions(), flags)
    other = replace(two, model=two.model | {"eos_token_id": 7})
    with pytest.raises(ValueError, match="no preset"):
        compose_dict(other, ComposeOptions(null_model=True), flags)
    with_plan = {**flags, "coordinator": flags["coordinator"] | {"--plan"}}
    coord = compose_dict(two, ComposeOptions(), with_plan)["services"]["coordinator"]
    assert "--plan" in coord["command"]
    assert "./plan.json:/etc/exegpt/plan.json:ro" in coord["volumes"]


def test_compose_writes_the_exact_model_config(tmp_path: Path, plan_file) -> None:  # noqa: ANN001
    from coordinator.commands._compose_spec import build_flags

    if "--model-config" not in build_flags()["coordinator"]:
        pytest.skip("this build's coordinator takes no --model-config")
    _, path = plan_file("waa", 2)
    done = _compose(path, tmp_path / "docker-compose.yml")
    assert done.returncode == 0, done.stderr
    written = json.loads((tmp_path / "models" /
                          "SmolLM2-135M-Instruct.Q4_1.gguf.config.json").read_text())
    assert written["num_layers"] == 30 and "is not there yet" in done.stderr


def test_unknown_flag_is_refused(plan_file) -> None:  # noqa: ANN001
    plan, _ = plan_file("waa", 3)
    flags = {**LEGACY, "decoder": LEGACY["decoder"] - {"--kv-advertise"}}
    with pytest.raises(ValueError, match="--kv-advertise"):
        compose_dict(plan, ComposeOptions(null_model=True), flags)


def test_yaml_writer_round_trips() -> None:
    value = {"a": {"b": ["x", "y: z", "#no comment"], "c": 1, "d": "quote\"d"},
             "e": ["long-" + "x" * 90, "b"], "f": {}, "g": None}
    assert yaml.safe_load(to_yaml(value)) == value


def test_override_needs_a_services_block() -> None:
    with pytest.raises(ValueError, match="services"):
        override_dict({"x-exegpt-plan": {}, "services": {}}, "name: x\n")


def test_bad_plan_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "plan.json"
    bad.write_text('{"policy": "waa-c"}')
    done = _compose(bad, tmp_path / "docker-compose.yml", "--null-model")
    assert done.returncode == 2 and "exegpt compose:" in done.stderr


def test_compose_runs_what_serve_runs(plan_file) -> None:  # noqa: ANN001
    """Same B_E, adjustment bands and capacities as `exegpt serve --plan` (plan_launch)."""
    from coordinator.commands._compose_spec import build_flags

    plan_launch = pytest.importorskip("coordinator.plan_launch")
    plan, _ = plan_file("waa", 2)
    fields = plan_launch.plan_fields(plan, null_model=False, decoder_capacity=256)
    flags = build_flags()
    data = compose_dict(plan, ComposeOptions(null_model=True), flags)
    cmd = data["services"]["coordinator"]["command"]
    assert cmd[cmd.index("--encode-batch") + 1] == str(fields["encode_batch"])
    for key in ("adjust_token_sum", "adjust_decode_batch"):
        flag = "--" + key.replace("_", "-")
        if flag in flags["coordinator"]:
            assert cmd[cmd.index(flag) + 1] == fields[key]
    for group in fields["groups"]:
        worker = data["services"][f"{group.role[:3]}0"]["command"]
        assert worker[worker.index("--capacity") + 1] == str(group.capacity)
