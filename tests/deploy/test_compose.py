"""docker-compose files: valid per the compose spec, what `exegpt serve --plan` runs, flags of
this build."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from coordinator.commands._compose_spec import (
    ComposeOptions,
    build_flags,
    compose_dict,
    override_dict,
    to_yaml,
)

ROOT = Path(__file__).resolve().parents[2]
EXEGPT = [sys.executable, "-m", "coordinator.cli"]
SHIPPED_PLAN = "deploy/up-plan.json"  # the source of the top-level docker-compose.yml


def _compose(plan_path: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EXEGPT, "compose", "--plan", str(plan_path), "--out", str(out),
                           *extra], capture_output=True, text=True, timeout=60, cwd=out.parent)


def _arg(cmd: list[str], flag: str) -> str:
    assert cmd.count(flag) == 1, (flag, cmd)
    return cmd[cmd.index(flag) + 1]


def test_top_level_compose_file_is_valid(validate_compose) -> None:  # noqa: ANN001
    done = validate_compose(ROOT / "docker-compose.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert "coordinator" in data["services"]
    assert data["services"]["coordinator"]["ports"] == ["5555:5555"]


def test_top_level_compose_file_is_what_compose_writes_for_its_plan(tmp_path: Path) -> None:
    """The shipped file is not stale: regenerating it from its (shipped) plan gives it back."""
    (tmp_path / "deploy").mkdir()
    shutil.copy(ROOT / SHIPPED_PLAN, tmp_path / SHIPPED_PLAN)
    done = subprocess.run([*EXEGPT, "compose", "--plan", SHIPPED_PLAN], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "docker-compose.yml").read_text() == \
        (ROOT / "docker-compose.yml").read_text()
    plan = json.loads((ROOT / SHIPPED_PLAN).read_text())
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert set(services) == {"coordinator", "stage0", "stage1"} and plan["policy"] == "rra"
    coord = services["coordinator"]
    assert f"./{SHIPPED_PLAN}:/etc/exegpt/plan.json:ro" in coord["volumes"]


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
    # RRA on 3 workers: three pipeline stages; WAA on 3: two encoders and one decoder
    assert set(base) == {"coordinator", "stage0", "stage1", "stage2"}
    parked = {n for n, s in over.items() if s.get("profiles") == ["exegpt-unused"]}
    assert parked == {"stage0", "stage1", "stage2"}
    assert set(over) - parked == {"coordinator", "enc0", "enc1", "dec0"}
    assert "--policy" not in over["coordinator"]["command"]  # compose replaces it wholesale


def test_waa_services_follow_the_plan(plan_file) -> None:  # noqa: ANN001
    plan, _ = plan_file("waa", 3)
    services = compose_dict(plan, ComposeOptions(null_model=True))["services"]
    encoders = [g for g in plan.worker_groups if g.role == "encoder"]
    decoders = [g for g in plan.worker_groups if g.role == "decoder"]
    assert set(services) == {"coordinator", *(f"enc{i}" for i in range(len(encoders))),
                             *(f"dec{i}" for i in range(len(decoders)))}
    coord = services["coordinator"]["command"]
    assert coord[:3] == ["python", "-m", "coordinator"]
    assert _arg(coord, "--encoders") == str(len(encoders))
    assert _arg(coord, "--decoders") == str(len(decoders))
    assert _arg(coord, "--encode-batch") == str(plan.B_E)
    assert _arg(coord, "--worker-endpoint") == "tcp://0.0.0.0:5556"
    assert _arg(coord, "--plan") == "/etc/exegpt/plan.json"
    assert "--policy" not in coord and "--ready-fd" not in coord
    low, high = plan.adjust["token_sum"]
    assert _arg(coord, "--adjust-token-sum") == f"{low:g},{high:g}"
    for name, svc in services.items():
        cmd = svc["command"]
        if name.startswith("dec"):
            assert cmd[2] == "decoder_worker" and "--role" not in cmd
            assert _arg(cmd, "--kv-bind") == "tcp://0.0.0.0:6000"
            assert _arg(cmd, "--kv-advertise") == f"tcp://{name}:6000"
        if name.startswith("enc"):
            assert cmd[2] == "encoder_worker" and "--kv-advertise" not in cmd
        if name != "coordinator":
            assert _arg(cmd, "--coordinator") == "tcp://coordinator:5556"
            assert _arg(cmd, "--worker-id") == name


@pytest.mark.parametrize("policy", ["rra", "static", "continuous"])
def test_pipeline_services_follow_the_plan(plan_file, policy: str) -> None:  # noqa: ANN001
    plan, _ = plan_file(policy, 3)
    assert plan.policy == policy and len(plan.worker_groups) == 3
    services = compose_dict(plan, ComposeOptions(null_model=True))["services"]
    assert set(services) == {"coordinator", "stage0", "stage1", "stage2"}
    coord = services["coordinator"]["command"]
    assert _arg(coord, "--policy") == policy
    assert _arg(coord, "--pipeline-stages") == "3"
    assert _arg(coord, "--stage-layers") == ",".join(f"{lo}:{hi}" for lo, hi in
                                                    (g.layer_range for g in plan.worker_groups))
    assert _arg(coord, "--encode-batch") == str(plan.B_E)
    assert _arg(coord, "--n-d") == str(plan.N_D or 1)
    assert _arg(coord, "--streams") == str(plan.microbatches)
    assert _arg(coord, "--encoders") == "0" and _arg(coord, "--decoders") == "0"
    assert "--adjust-token-sum" not in coord  # pipeline streams run B_E unadjusted
    for stage in range(3):
        cmd = services[f"stage{stage}"]["command"]
        assert cmd[:3] == ["python", "-m", "decoder_worker"]
        assert _arg(cmd, "--role") == "pipeline" and _arg(cmd, "--stage") == str(stage)
        assert _arg(cmd, "--worker-id") == f"stage{stage}"
        assert _arg(cmd, "--kv-bind") == "tcp://0.0.0.0:6000"
        assert _arg(cmd, "--kv-advertise") == f"tcp://stage{stage}:6000"
        assert _arg(cmd, "--coordinator") == "tcp://coordinator:5556"


def test_tp_groups_become_one_service_per_rank(plan_file) -> None:  # noqa: ANN001
    from coordinator.planner.plan import WorkerGroup

    plan, _ = plan_file("waa", 3)
    waa = replace(plan, num_workers=4, worker_groups=(
        WorkerGroup("encoder", 2, 2, (0, 30)), WorkerGroup("decoder", 2, 2, (0, 30))))
    services = compose_dict(waa, ComposeOptions(null_model=True))["services"]
    assert list(services) == ["coordinator", "enc0-r0", "enc0-r1", "dec0-r0", "dec0-r1"]
    assert _arg(services["coordinator"]["command"], "--decoders") == "2"  # ranks count
    for name, svc in list(services.items())[1:]:
        cmd = svc["command"]
        group, rank = name.split("-r")
        assert _arg(cmd, "--worker-id") == f"{group}.r{rank}"
        assert (_arg(cmd, "--tp-rank"), _arg(cmd, "--tp-size")) == (rank, "2")
        assert _arg(cmd, "--tp-init") == f"tcp://{group}-r0:29500"
    rra, _ = plan_file("rra", 2)
    rra = replace(rra, num_workers=4, worker_groups=(
        WorkerGroup("pipeline", 2, 2, (0, 12)), WorkerGroup("pipeline", 2, 2, (12, 30))))
    services = compose_dict(rra, ComposeOptions(null_model=True))["services"]
    assert list(services) == ["coordinator", "stage0-r0", "stage0-r1", "stage1-r0", "stage1-r1"]
    assert _arg(services["coordinator"]["command"], "--stage-layers") == "0:12,12:30"
    for name in ("stage1-r0", "stage1-r1"):
        cmd = services[name]["command"]
        assert _arg(cmd, "--stage") == "1" and _arg(cmd, "--tp-init") == "tcp://stage1-r0:29500"
        assert _arg(cmd, "--kv-advertise") == f"tcp://{name}:6000"


def _serve_argvs(plan_path: Path, *extra: str) -> list[list[str]]:
    """The argv of every process `exegpt serve --plan` starts (tcp), coordinator first."""
    from coordinator.cli import build_parser
    from coordinator.commands.serve import spec_from_args

    args = build_parser().parse_args(["serve", "--plan", str(plan_path), "--transport", "tcp",
                                      *extra])
    spec = spec_from_args(args)
    children = [spec.coordinator_child(99), *spec.worker_children("tcp://127.0.0.1:5556")]
    return [list(child.argv) for child in children]


# What Docker provides differently from the local launcher (the only allowed differences).
PLACES = ("--client-endpoint", "--worker-endpoint", "--coordinator", "--kv-bind", "--tp-init",
          "--plan", "--model-config", "--model", "--tokenizer")


def _normal(argv: list[str]) -> list[str]:
    out = ["python", *argv[1:]]
    for flag in ("--ready-fd", "--kv-advertise"):
        if flag in out:
            del out[out.index(flag):out.index(flag) + 2]
    for flag in PLACES:
        if flag in out:
            out[out.index(flag) + 1] = "<place>"
    return out


@pytest.mark.parametrize("policy", ["waa", "rra"])
def test_compose_runs_what_serve_runs(plan_file, policy: str) -> None:  # noqa: ANN001
    """Every process and flag of `exegpt serve --plan` (null model), endpoints and paths
    aside: policy, stages, layer ranges, B_E, N_D, streams, bands, capacities, heartbeats."""
    plan, path = plan_file(policy, 3)
    serve = [_normal(a) for a in _serve_argvs(path, "--null-model",
                                              "--model-shape", "smollm2-135m")]
    services = compose_dict(plan, ComposeOptions(null_model=True))["services"]
    assert [_normal(s["command"]) for s in services.values()] == serve


def test_real_model_services(plan_file) -> None:  # noqa: ANN001
    two, _ = plan_file("waa", 2, "two.json")
    data = compose_dict(two, ComposeOptions())
    coord = data["services"]["coordinator"]
    gguf = "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert _arg(coord["command"], "--model-config") == gguf + ".config.json"
    assert _arg(coord["command"], "--tokenizer") == gguf
    assert "--model-shape" not in coord["command"]  # the exact config, not a look-alike preset
    assert "./models:/models:ro" in coord["volumes"]
    assert "./plan.json:/etc/exegpt/plan.json:ro" in coord["volumes"]
    for name in ("enc0", "dec0"):
        cmd = data["services"][name]["command"]
        assert (_arg(cmd, "--model"), _arg(cmd, "--dtype")) == (gguf, "bfloat16")
        assert "--null-model" not in cmd
        assert "./models:/models:ro" in data["services"][name]["volumes"]


def test_plans_serve_refuses_are_refused(plan_file) -> None:  # noqa: ANN001
    split, _ = plan_file("waa", 3)  # the encoders hold layer halves: a WAA encode pipeline
    services = compose_dict(split, ComposeOptions())["services"]  # now runs: stage workers
    ranges = [list(g.layer_range) for g in split.worker_groups if g.role == "encoder"]
    assert _arg(services["coordinator"]["command"], "--waa-encoder-layers") == ",".join(
        f"{lo}:{hi}" for lo, hi in ranges)
    assert _arg(services["enc1"]["command"], "--role") == "pipeline"
    t5, _ = plan_file("rra", 2, "t5.json", model="tiny-t5")  # T5 over 2 stages now runs
    coord = compose_dict(t5, ComposeOptions())["services"]["coordinator"]["command"]
    assert _arg(coord, "--stage-encoder-layers") == "0:1,1:2"
    two, _ = plan_file("waa", 2, "two.json")
    other = replace(two, model=two.model | {"eos_token_id": 7})
    with pytest.raises(ValueError, match="no preset"):
        compose_dict(other, ComposeOptions(null_model=True))


def test_compose_writes_the_exact_model_config(tmp_path: Path, plan_file) -> None:  # noqa: ANN001
    _, path = plan_file("rra", 2)
    done = _compose(path, tmp_path / "docker-compose.yml")
    assert done.returncode == 0, done.stderr
    written = json.loads((tmp_path / "models" /
                          "SmolLM2-135M-Instruct.Q4_1.gguf.config.json").read_text())
    assert written["num_layers"] == 30 and "is not there yet" in done.stderr


def test_model_file_of_another_shape_is_refused(tmp_path: Path, plan_file) -> None:  # noqa: ANN001
    from common.models.gguf_loader import default_gguf_path

    gguf = default_gguf_path()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / gguf.name).symlink_to(gguf)
    _, path = plan_file("rra", 2, model="tiny-llama")
    done = _compose(path, tmp_path / "docker-compose.yml")
    assert done.returncode == 2 and "another model shape" in done.stderr


@pytest.mark.parametrize(("policy", "role", "flag"), [("waa", "decoder", "--kv-advertise"),
                                                       ("rra", "pipeline", "--stage"),
                                                       ("rra", "coordinator", "--n-d")])
def test_unknown_flag_is_refused(plan_file, policy: str, role: str, flag: str) -> None:  # noqa: ANN001
    plan, _ = plan_file(policy, 3)
    flags = build_flags()
    assert flag in flags[role]
    with pytest.raises(ValueError, match=flag):
        compose_dict(plan, ComposeOptions(null_model=True), {**flags, role: flags[role] - {flag}})


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
