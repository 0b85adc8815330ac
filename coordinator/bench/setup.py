"""What an evaluation needs before its first run: the mesh target, the profile, the workload
and its K requests. Kept apart from the run loop so tests can build each piece alone."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.bench.config import BenchConfig
from coordinator.bench.meshrun import Target
from coordinator.bench.workset import BenchRequest, draw_requests, probe_shift

NULL_PROFILE_GPU = "a40"  # the null model does no math: its plan is made for an analytic GPU


@dataclass(frozen=True)
class Setup:
    target: Target
    model_config: Any  # ModelConfig
    model_path: str | None  # what transformers loads for the reference (None: nothing)
    profile: Any  # planner Profile
    profile_source: str
    workload: Any  # planner Workload
    requests: tuple[BenchRequest, ...]

    @property
    def s99(self) -> int:
        return int(self.workload.p99_output)

    def describe(self, cfg: BenchConfig) -> dict[str, Any]:
        outs = [r.output_len for r in self.requests]
        return {"workload": self.workload.spec, "workload_description": self.workload.describe(),
                "p99_output": self.s99, "requests": len(self.requests),
                "probes": sum(r.probe for r in self.requests),
                "probe_mean_output_shift": probe_shift(self.workload, cfg.requests, cfg.seed),
                "mean_input": sum(len(r.prompt_ids) for r in self.requests) / len(outs),
                "mean_output": sum(outs) / len(outs), "profile": self.profile_source}


def resolve_target(cfg: BenchConfig) -> tuple[Target, Any, str | None]:
    """(mesh target, ModelConfig, file for transformers) for ``cfg.model``."""
    from common.models.config import ModelConfig

    if cfg.null_model:
        if cfg.model not in ModelConfig.preset_names():
            raise ValueError(f"--null-model needs --model PRESET (one of "
                             f"{', '.join(ModelConfig.preset_names())}), got {cfg.model!r}")
        return Target(True, cfg.model), ModelConfig.preset(cfg.model), None
    from coordinator.commands.serve import model_fields

    fields = model_fields(cfg.model)
    cfg_model = ModelConfig.from_dict(fields["model_config"])
    path = fields["model"] if Path(fields["model"]).exists() else None
    return Target(False, "tiny-llama", fields, cfg.dtype), cfg_model, path


def load_profile(cfg: BenchConfig, model_cfg: Any, say: Any) -> tuple[Any, str]:
    """The profile to plan from: ``--profile``, else this machine's cached (or freshly
    measured) profile, as `exegpt up` uses; the null model defaults to an analytic GPU."""
    from coordinator.planner.analytic import analytic_profile, parse_profile_arg

    if cfg.profile is not None and cfg.profile.count(":") == 1 and \
            cfg.profile.startswith("analytic:"):  # analytic:GPU -> the served model's shape
        gpu = cfg.profile.split(":")[1]
        return analytic_profile(gpu, model_cfg, cfg.dtype), f"{cfg.profile}:{cfg.model}"
    if cfg.profile is not None:
        return parse_profile_arg(cfg.profile, cfg.dtype), cfg.profile
    if cfg.null_model:
        return (analytic_profile(NULL_PROFILE_GPU, model_cfg, cfg.dtype),
                f"analytic:{NULL_PROFILE_GPU}:{cfg.model}")
    from coordinator.commands._up_profile import (
        ProfileKey,
        load_or_measure,
        torch_version,
        valid_tp_sizes,
    )

    label = Path(cfg.model).stem if cfg.model.endswith(".gguf") else Path(cfg.model).name
    key = ProfileKey(label, model_cfg, "cpu", cfg.dtype, torch_version(), 1,
                     valid_tp_sizes(model_cfg, cfg.workers))
    profile, path, _ = load_or_measure(key, say=say, quick=cfg.quick)
    return profile, str(path)


def build_setup(cfg: BenchConfig, say: Any = print) -> Setup:
    from coordinator.planner.workload import parse_workload

    target, model_cfg, path = resolve_target(cfg)
    profile, source = load_profile(cfg, model_cfg, say)
    workload = parse_workload(cfg.workload)
    requests = draw_requests(workload, cfg.requests, cfg.seed, target.vocab_size,
                             max_context=model_cfg.max_position)
    return Setup(target, model_cfg, path, profile, source, workload, tuple(requests))
