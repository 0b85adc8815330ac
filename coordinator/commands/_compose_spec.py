"""A plan -> a docker-compose file: one coordinator service and one service per worker process.

    coordinator   python -m coordinator      binds tcp://0.0.0.0:5555 (clients, published)
                                             and tcp://0.0.0.0:5556 (workers); waits for the
                                             plan's worker processes to be READY, then serves
    enc0, dec0 .. python -m encoder_worker / decoder_worker, connect to coordinator:5556;
                  a decoder binds 0.0.0.0:6000 and advertises tcp://<its service>:6000 so
                  encoders send KV to it directly (service names are the hostnames)

Why one service per worker and not ``scale:``: each decoder must advertise its own KV
hostname and each TP rank its own rank, and replicas of one service share one environment.
The services' flags are checked against the parsers of this build (``python -m coordinator``
and the workers), so a generated file never names a flag the code does not have; when the
coordinator takes ``--plan``, the plan file (a volume) is what assigns roles and layer ranges.
Everything is plain data here; ``to_yaml`` writes it (JSON flow style for scalars and lists,
which every YAML parser reads), so generating needs no YAML library.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from typing import Any

CLIENT_PORT = 5555
WORKER_PORT = 5556
KV_PORT = 6000
TP_INIT_PORT = 29500  # rank 0 of a TP group hosts the group's gloo rendezvous
PLAN_IN_CONTAINER = "/etc/exegpt/plan.json"
RUNS_IN_CONTAINER = "/runs"
MODELS_IN_CONTAINER = "/models"
KEYS_IN_CONTAINER = "/keys"


@dataclass(frozen=True)
class ComposeOptions:
    """How the services are built and wired (defaults match the top-level Dockerfile)."""

    image: str = "exegpt:latest"
    build: str | None = "."
    plan_file: str = "./plan.json"
    models_dir: str = "./models"
    model_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf"
    runs_dir: str = "./runs"
    run_id: str = "compose"
    client_port: int = CLIENT_PORT
    null_model: bool = False
    dtype: str = "bfloat16"
    curve_dir: str | None = None  # `exegpt keys --dir`: the client port then requires CURVE

    def __post_init__(self) -> None:
        if not 0 < self.client_port < 65536:
            raise ValueError(f"client port must be in 1..65535, got {self.client_port}")
        if "/" in self.model_file:
            raise ValueError(f"model file must be a file name inside {self.models_dir}, "
                             f"got {self.model_file!r}")

    @property
    def model_config_name(self) -> str:
        """The model's ModelConfig JSON beside it in the models volume (`exegpt compose`
        writes it from the model file: the workers refuse any other config)."""
        return f"{self.model_file}.config.json"


@dataclass(frozen=True)
class WorkerUnit:
    """One worker process: its service name, module, id and TP position."""

    service: str
    role: str
    worker_id: str
    tp_rank: int
    tp_size: int


def parser_flags(add_arguments: Any, *extra: Any) -> set[str]:
    parser = argparse.ArgumentParser()
    add_arguments(parser, *extra)
    return {opt for action in parser._actions for opt in action.option_strings}


def build_flags() -> dict[str, set[str]]:
    """The flags `python -m coordinator|encoder_worker|decoder_worker` take in this build."""
    from common import workerconfig
    from coordinator import config

    return {"coordinator": parser_flags(config.add_arguments),
            "encoder": parser_flags(workerconfig.add_arguments, "encoder"),
            "decoder": parser_flags(workerconfig.add_arguments, "decoder")}


def worker_units(plan: Any, plan_mode: bool) -> list[WorkerUnit]:
    """The plan's worker processes. Without plan support in the coordinator a pipeline stage
    (RRA) runs as one encoder plus one decoder, as `exegpt serve --null-model` does."""
    units: list[WorkerUnit] = []
    index = {"encoder": 0, "decoder": 0}
    for group in plan.worker_groups:
        roles = ("decoder",) if group.role == "pipeline" and plan_mode else (
            ("encoder", "decoder") if group.role == "pipeline" else (group.role,))
        for role in roles:
            stem = f"{role[:3]}{index[role]}"
            index[role] += 1
            for rank in range(group.tp_size):
                suffix = f".r{rank}" if group.tp_size > 1 else ""
                units.append(WorkerUnit(stem + suffix.replace(".", "-"), role, stem + suffix,
                                        rank, group.tp_size))
    return units


# What the coordinator takes from the model config: a preset equal on these may stand in for it.
COORDINATOR_FIELDS = ("family", "vocab_size", "hidden_size", "num_layers", "num_encoder_layers",
                      "num_heads", "num_kv_heads", "head_dim", "ffn_size", "max_position",
                      "bos_token_id", "eos_token_id", "pad_token_id")


def matching_preset(model: dict[str, Any]) -> str | None:
    """The preset the coordinator can use for ``model`` (no model.json file needed)."""
    from common.models.config import ModelConfig

    for name in ModelConfig.preset_names():
        preset = ModelConfig.preset(name).to_dict()
        if all(preset.get(k) == model.get(k) for k in COORDINATOR_FIELDS):
            return name
    return None


def compose_dict(plan: Any, opts: ComposeOptions,
                 flags: dict[str, set[str]] | None = None) -> dict[str, Any]:
    """The whole compose file for ``plan`` as plain data."""
    flags = build_flags() if flags is None else flags
    plan_mode = "--plan" in flags["coordinator"]
    if not opts.null_model and not ("--model" in flags["decoder"] or plan_mode):
        raise ValueError("the workers of this build cannot load a real model yet (no --model "
                         "or --plan option); pass --null-model to generate a null-model mesh")
    fields = launch_fields(plan, opts.null_model)
    if not opts.null_model and not plan_mode and not fields:
        from coordinator.commands._mesh_proc import _check_expressible

        _check_expressible(plan)
    units = worker_units(plan, plan_mode)
    services = {"coordinator": _coordinator(plan, opts, flags["coordinator"], units, fields)}
    for unit in units:
        services[unit.service] = _worker(unit, opts, flags[unit.role], fields)
    return {"name": "exegpt", "x-exegpt-plan": _plan_summary(plan), "services": services}


def launch_fields(plan: Any, null_model: bool) -> dict[str, Any]:
    """What `exegpt serve --plan` would launch for ``plan`` (coordinator.plan_launch): the
    same refusals, capacities and B_E adjustment bands, so compose runs what serve runs.
    Empty when this build has no plan_launch, or (null model only) when it refuses the plan:
    the null model then tries the mesh with one encoder and one decoder per stage."""
    try:
        from coordinator.plan_launch import plan_fields
    except ImportError:
        return {}
    try:
        return dict(plan_fields(plan, null_model=null_model, decoder_capacity=256))
    except ValueError:
        if null_model:
            return {}
        raise


def _common(opts: ComposeOptions) -> dict[str, Any]:
    return {"image": opts.image, **({"build": opts.build} if opts.build else {}),
            "environment": {"EXEGPT_RUNS_DIR": RUNS_IN_CONTAINER, "EXEGPT_RUN_ID": opts.run_id,
                            "EXEGPT_LOG_CONSOLE": "json", "PYTHONUNBUFFERED": "1"},
            "volumes": [f"{opts.runs_dir}:{RUNS_IN_CONTAINER}"]}


def _coordinator(plan: Any, opts: ComposeOptions, flags: set[str], units: list[WorkerUnit],
                 fields: dict[str, Any]) -> dict[str, Any]:
    cmd = ["python", "-m", "coordinator",
           "--client-endpoint", f"tcp://0.0.0.0:{CLIENT_PORT}",
           "--worker-endpoint", f"tcp://0.0.0.0:{WORKER_PORT}",
           "--encoders", str(sum(u.role == "encoder" for u in units)),
           "--decoders", str(sum(u.role == "decoder" for u in units)),
           "--encode-batch", str(fields.get("encode_batch", plan.B_E))]
    for key in ("adjust_token_sum", "adjust_decode_batch"):
        flag = "--" + key.replace("_", "-")
        if key in fields and flag in flags:
            cmd += [flag, fields[key]]
    service = _common(opts)
    if opts.null_model:
        preset = matching_preset(plan.model)
        if preset is None:
            raise ValueError("the null model sizes its work by a model preset and no preset "
                             "has the plan's model shape; plan for a preset model")
        cmd += ["--model-shape", preset]
    if "--plan" in flags:
        cmd += ["--plan", PLAN_IN_CONTAINER]
        service["volumes"].append(f"{opts.plan_file}:{PLAN_IN_CONTAINER}:ro")
    elif not opts.null_model and "--model-config" in flags:
        cmd += ["--model-config", f"{MODELS_IN_CONTAINER}/{opts.model_config_name}"]
    if not opts.null_model and "--tokenizer" in flags:
        cmd += ["--tokenizer", f"{MODELS_IN_CONTAINER}/{opts.model_file}"]
    if not opts.null_model:
        service["volumes"].append(f"{opts.models_dir}:{MODELS_IN_CONTAINER}:ro")
    if opts.curve_dir is not None:  # the server pair and the allow-list, read-only
        cmd += ["--curve-server-key", f"{KEYS_IN_CONTAINER}/server.key_secret",
                "--curve-allow", f"{KEYS_IN_CONTAINER}/allow"]
        service["volumes"].append(f"{opts.curve_dir}:{KEYS_IN_CONTAINER}:ro")
    _check(cmd, flags, "python -m coordinator")
    service.update(command=cmd, ports=[f"{opts.client_port}:{CLIENT_PORT}"],
                   stop_grace_period="20s")
    return service


def _worker(unit: WorkerUnit, opts: ComposeOptions, flags: set[str],
            fields: dict[str, Any]) -> dict[str, Any]:
    cmd = ["python", "-m", f"{unit.role}_worker",
           "--coordinator", f"tcp://coordinator:{WORKER_PORT}", "--worker-id", unit.worker_id,
           "--tp-rank", str(unit.tp_rank), "--tp-size", str(unit.tp_size)]
    capacity = next((g.capacity for g in fields.get("groups", ()) if g.role == unit.role), None)
    if capacity is not None and "--capacity" in flags:
        cmd += ["--capacity", str(capacity)]
    if unit.tp_size > 1 and "--tp-init" in flags:
        rank0 = unit.service.rsplit("-r", 1)[0] + "-r0"
        cmd += ["--tp-init", f"tcp://{rank0}:{TP_INIT_PORT}"]
    if unit.role == "decoder":
        cmd += ["--kv-bind", f"tcp://0.0.0.0:{KV_PORT}",
                "--kv-advertise", f"tcp://{unit.service}:{KV_PORT}"]
    service = _common(opts)
    if opts.null_model:
        cmd.append("--null-model")
    elif "--model" in flags:
        cmd += ["--model", f"{MODELS_IN_CONTAINER}/{opts.model_file}"]
        cmd += ["--dtype", opts.dtype] if "--dtype" in flags else []
    if not opts.null_model:
        service["volumes"].append(f"{opts.models_dir}:{MODELS_IN_CONTAINER}:ro")
    _check(cmd, flags, f"python -m {unit.role}_worker")
    service.update(command=cmd, depends_on=["coordinator"], restart="on-failure")
    return service


def _check(cmd: list[str], flags: set[str], who: str) -> None:
    unknown = [a for a in cmd if a.startswith("--") and a not in flags]
    if unknown:
        raise ValueError(f"{who} in this build has no {', '.join(unknown)} option")


def _plan_summary(plan: Any) -> dict[str, Any]:
    pr = plan.predicted
    return {"policy": plan.policy, "workload": plan.workload,
            "latency_bound_s": plan.latency_bound_s, "B_E": plan.B_E,
            "groups": [f"{g.role} x{g.count} tp{g.tp_size} layers {g.layer_range[0]}-"
                       f"{g.layer_range[1]}" for g in plan.worker_groups],
            "predicted_throughput_seq_s": round(float(pr["throughput_seq_s"]), 4),
            "predicted_latency_p99len_s": round(float(pr["latency_p99len_s"]), 4)}


def override_dict(full: dict[str, Any], base_text: str) -> dict[str, Any]:
    """An override of an exegpt-generated base file: this plan's services replace the base's
    (compose replaces ``command`` wholesale); base workers the plan does not have are moved to
    a profile nobody activates, so ``docker compose up`` does not start them."""
    base_services = set(re.findall(r"^  ([A-Za-z0-9._-]+):\s*$", _services_block(base_text),
                                   re.MULTILINE))
    services = dict(full["services"])
    for name in sorted(base_services - set(services)):
        services[name] = {"profiles": ["exegpt-unused"]}
    return {"x-exegpt-plan": full["x-exegpt-plan"], "services": services}


def _services_block(text: str) -> str:
    match = re.search(r"^services:\s*$(.*?)(?=^\S|\Z)", text, re.MULTILINE | re.DOTALL)
    if match is None:
        raise ValueError("the base compose file has no top-level services: block")
    return match.group(1)


def to_yaml(value: Any, indent: int = 0) -> str:
    """Block mappings, JSON flow scalars and lists (valid YAML 1.2, readable, dependency-free)."""
    pad = "  " * indent
    lines = []
    for key, item in value.items():
        if isinstance(item, dict) and item:
            lines.append(f"{pad}{key}:")
            lines.append(to_yaml(item, indent + 1))
        elif isinstance(item, list) and item and all(isinstance(i, str) for i in item) \
                and len(json.dumps(item)) > 80:
            lines.append(f"{pad}{key}:")
            lines += [f"{pad}  - {json.dumps(i)}" for i in item]
        else:
            lines.append(f"{pad}{key}: {json.dumps(item)}")
    return "\n".join(lines)
