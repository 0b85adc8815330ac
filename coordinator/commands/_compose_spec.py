"""A plan -> a docker-compose file: the processes `exegpt serve --plan` would start, as services.

    coordinator      python -m coordinator    binds tcp://0.0.0.0:5555 (clients, published)
                                              and tcp://0.0.0.0:5556 (workers); waits for the
                                              plan's worker processes to be READY, then serves
    enc0, dec0 ..    WAA plans: python -m encoder_worker / decoder_worker
    stage0, stage1   rra / static / continuous plans: python -m decoder_worker --role pipeline
                     --stage S (one service per stage, in pipeline order)

Single source: the services are translated from the :class:`coordinator.launch.LaunchSpec`
that `exegpt serve --plan` builds for the plan (``coordinator.plan_launch.plan_fields``), so the
coordinator gets the same policy, stages, layer ranges, B_E, N_D, streams and adjustment bands
and every worker rank the same flags. Only what Docker provides differently is rewritten:
endpoints are service names (workers connect to ``tcp://coordinator:5556``; a decoder or stage
binds ``0.0.0.0:6000`` and advertises ``tcp://<its service>:6000``; rank 0 of a TP group hosts
the gloo rendezvous at ``tcp://<group>-r0:29500``), files are volumes (model, its config, the
plan at /etc/exegpt/plan.json for the stats, CURVE keys) and there is no status pipe.

Why one service per worker and not ``scale:``: each decoder or stage advertises its own
hostname and each TP rank has its own rank, and replicas of one service share one
environment. Every flag of every command is checked against the parsers of this build, so a
generated file never names a flag the code lacks.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.commands._compose_yaml import override_dict, to_yaml

CLIENT_PORT = 5555
WORKER_PORT = 5556
KV_PORT = 6000
TP_INIT_PORT = 29500  # rank 0 of a TP group hosts the group's gloo rendezvous
DECODER_CAPACITY = 256  # `exegpt serve --decoder-capacity`'s default
PLAN_IN_CONTAINER = "/etc/exegpt/plan.json"
RUNS_IN_CONTAINER = "/runs"
MODELS_IN_CONTAINER = "/models"
KEYS_IN_CONTAINER = "/keys"

__all__ = ["ComposeOptions", "build_flags", "compose_dict", "launch_spec", "override_dict",
           "to_yaml", "worker_services"]


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
    curve_workers: bool = False  # ... and the worker port and KV endpoints (keys --workers N)

    def __post_init__(self) -> None:
        if self.curve_workers and not self.curve_dir:
            raise ValueError("CURVE between coordinator and workers needs --curve-dir (the "
                             "keys of `exegpt keys --workers N`)")
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

    @property
    def model_path(self) -> str:
        return f"{MODELS_IN_CONTAINER}/{self.model_file}"


def _flags_of(parser: argparse.ArgumentParser) -> set[str]:
    return {opt for action in parser._actions for opt in action.option_strings}


def build_flags() -> dict[str, set[str]]:
    """The flags of `python -m coordinator`, `encoder_worker` and `decoder_worker` (--role
    decoder and --role pipeline) in this build, from their own parsers."""
    from common import workerconfig
    from coordinator import config
    from decoder_worker.__main__ import build_parser

    coordinator = argparse.ArgumentParser()
    config.add_arguments(coordinator)
    encoder = argparse.ArgumentParser()
    workerconfig.add_arguments(encoder, "encoder")
    return {"coordinator": _flags_of(coordinator), "encoder": _flags_of(encoder),
            "decoder": _flags_of(build_parser("decoder")),
            "pipeline": _flags_of(build_parser("pipeline"))}


# What the coordinator takes from the model config: a preset equal on these may stand in for it.
COORDINATOR_FIELDS = ("family", "vocab_size", "hidden_size", "num_layers", "num_encoder_layers",
                      "num_heads", "num_kv_heads", "head_dim", "ffn_size", "max_position",
                      "bos_token_id", "eos_token_id", "pad_token_id")


def matching_preset(model: dict[str, Any]) -> str | None:
    """The preset the null model can size its work by for ``model``."""
    from common.models.config import ModelConfig

    for name in ModelConfig.preset_names():
        preset = ModelConfig.preset(name).to_dict()
        if all(preset.get(k) == model.get(k) for k in COORDINATOR_FIELDS):
            return name
    return None


def launch_spec(plan: Any, opts: ComposeOptions) -> Any:
    """The LaunchSpec `exegpt serve --plan` builds for ``plan`` (same refusals, groups, knobs),
    with container paths: the model and its tokenizer in /models, the plan file, the keys."""
    from coordinator.launch import LaunchSpec
    from coordinator.plan_launch import plan_fields

    fields = plan_fields(plan, null_model=opts.null_model, decoder_capacity=DECODER_CAPACITY)
    model: dict[str, Any]
    if opts.null_model:
        preset = matching_preset(plan.model)
        if preset is None:
            raise ValueError("the null model sizes its work by a model preset and no preset "
                             "has the plan's model shape; plan for a preset model")
        model = {"model_shape": preset}
    else:  # compose.py writes the exact config beside the model file; the plan's stands in
        model = {"model": opts.model_path, "model_config": dict(plan.model),
                 "tokenizer": opts.model_path, "dtype": opts.dtype}
    curve = (("--curve-server-key", f"{KEYS_IN_CONTAINER}/server.key_secret",
              "--curve-allow", f"{KEYS_IN_CONTAINER}/allow") if opts.curve_dir else ())
    if opts.curve_workers:
        curve += ("--curve-worker-allow", f"{KEYS_IN_CONTAINER}/allow-workers")
    return LaunchSpec(**fields, **model, transport="tcp", host="0.0.0.0",
                      client_endpoint=f"tcp://0.0.0.0:{CLIENT_PORT}",
                      runs_path=Path(RUNS_IN_CONTAINER), run_id=opts.run_id,
                      plan_file=PLAN_IN_CONTAINER, coordinator_args=curve)


def compose_dict(plan: Any, opts: ComposeOptions,
                 flags: dict[str, set[str]] | None = None) -> dict[str, Any]:
    """The whole compose file for ``plan`` as plain data."""
    flags = build_flags() if flags is None else flags
    spec = launch_spec(plan, opts)
    services = {"coordinator": _coordinator(spec, opts, flags["coordinator"])}
    for index, (name, cmd) in enumerate(worker_services(spec)):
        services[name] = _worker(cmd, opts, flags)
        if opts.curve_workers:
            _worker_keys(services[name], opts, index)
    return {"name": "exegpt", "x-exegpt-plan": _plan_summary(plan), "services": services}


def worker_services(spec: Any) -> list[tuple[str, list[str]]]:
    """(service name, command) of every worker rank of ``spec``, in launch order: serve's argv
    with Docker's endpoints (worker ids ``dec0.r1`` become hostnames ``dec0-r1``)."""
    out = []
    for child in spec.worker_children(f"tcp://coordinator:{WORKER_PORT}"):
        argv = list(child.argv)
        worker_id = _value(argv, "--worker-id")
        service = worker_id.replace(".", "-")
        if "--tp-init" in argv:
            _set(argv, "--tp-init", f"tcp://{worker_id.split('.')[0]}-r0:{TP_INIT_PORT}")
        if "--kv-bind" in argv:
            _set(argv, "--kv-bind", f"tcp://0.0.0.0:{KV_PORT}")
            argv += ["--kv-advertise", f"tcp://{service}:{KV_PORT}"]
        out.append((service, ["python", *argv[1:]]))
    return out


def _coordinator(spec: Any, opts: ComposeOptions, flags: set[str]) -> dict[str, Any]:
    argv = list(spec.coordinator_child(status_fd=-1).argv)
    _drop(argv, "--ready-fd")  # no launcher's status pipe: Docker only watches the process
    _set(argv, "--worker-endpoint", f"tcp://0.0.0.0:{WORKER_PORT}")
    service = _common(opts)
    service["volumes"].append(f"{opts.plan_file}:{PLAN_IN_CONTAINER}:ro")
    if spec.model_config is not None:  # the exact config, not a look-alike preset
        _set(argv, "--model-config", f"{MODELS_IN_CONTAINER}/{opts.model_config_name}")
        _drop(argv, "--model-shape")
        service["volumes"].append(f"{opts.models_dir}:{MODELS_IN_CONTAINER}:ro")
    if opts.curve_dir is not None:  # the server pair and the allow-list, read-only
        service["volumes"].append(f"{opts.curve_dir}:{KEYS_IN_CONTAINER}:ro")
    cmd = ["python", *argv[1:]]
    _check(cmd, flags, "python -m coordinator")
    service.update(command=cmd, ports=[f"{opts.client_port}:{CLIENT_PORT}"],
                   stop_grace_period="20s")
    return service


def _worker(cmd: list[str], opts: ComposeOptions,
            flags: dict[str, set[str]]) -> dict[str, Any]:
    module = cmd[2]
    role = "encoder" if module == "encoder_worker" else (
        _value(cmd, "--role") if "--role" in cmd else "decoder")
    _check(cmd, flags[role], f"python -m {module} ({role})")
    service = _common(opts)
    if not opts.null_model:
        service["volumes"].append(f"{opts.models_dir}:{MODELS_IN_CONTAINER}:ro")
    service.update(command=cmd, depends_on=["coordinator"], restart="on-failure")
    return service


def _worker_keys(service: dict[str, Any], opts: ComposeOptions, index: int) -> None:
    """Worker CURVE: mount only the files this worker needs (not the coordinator's or the
    clients' secrets): the server public key, its own pair (worker-<index>) and the mesh pair."""
    keys = {"server.key": "server.key", f"workers/worker-{index}.key_secret": "worker.key_secret",
            "mesh.key_secret": "mesh.key_secret"}
    service["volumes"] += [f"{opts.curve_dir}/{src}:{KEYS_IN_CONTAINER}/{dst}:ro"
                           for src, dst in keys.items()]
    service["command"] += ["--curve-coordinator-key", f"{KEYS_IN_CONTAINER}/server.key",
                           "--curve-key", f"{KEYS_IN_CONTAINER}/worker.key_secret",
                           "--curve-mesh-key", f"{KEYS_IN_CONTAINER}/mesh.key_secret"]


def _common(opts: ComposeOptions) -> dict[str, Any]:
    return {"image": opts.image, **({"build": opts.build} if opts.build else {}),
            "environment": {"EXEGPT_RUNS_DIR": RUNS_IN_CONTAINER, "EXEGPT_RUN_ID": opts.run_id,
                            "EXEGPT_LOG_CONSOLE": "json", "PYTHONUNBUFFERED": "1"},
            "volumes": [f"{opts.runs_dir}:{RUNS_IN_CONTAINER}"]}


def _value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _set(argv: list[str], flag: str, value: str) -> None:
    argv[argv.index(flag) + 1] = value


def _drop(argv: list[str], flag: str) -> None:
    at = argv.index(flag)
    del argv[at:at + 2]


def _check(cmd: list[str], flags: set[str], who: str) -> None:
    unknown = [a for a in cmd if a.startswith("--") and a not in flags]
    if unknown:
        raise ValueError(f"{who} in this build has no {', '.join(unknown)} option")


def _plan_summary(plan: Any) -> dict[str, Any]:
    pr = plan.predicted
    knobs: dict[str, Any] = {}
    if plan.policy == "rra":
        knobs["N_D"] = plan.N_D
    if plan.policy in ("rra", "static", "continuous"):
        knobs["microbatches"] = plan.microbatches
    return {"policy": plan.policy, "workload": plan.workload,
            "latency_bound_s": plan.latency_bound_s, "B_E": plan.B_E, **knobs,
            "groups": [f"{g.role} x{g.count} tp{g.tp_size} layers {g.layer_range[0]}-"
                       f"{g.layer_range[1]}" for g in plan.worker_groups],
            "predicted_throughput_seq_s": round(float(pr["throughput_seq_s"]), 4),
            "predicted_latency_p99len_s": round(float(pr["latency_p99len_s"]), 4)}
