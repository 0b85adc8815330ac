"""Launch spec -> a running local mesh (coordinator + worker processes), and its shutdown.

A :class:`LaunchSpec` names worker groups (role, count, tp_size) and how to reach the
coordinator; a plan fills them (coordinator.plan_launch). WAA (``policy="waa"``) runs encoder
and decoder groups; rra / static / continuous run one ``pipeline`` group per stage, in pipeline
order, each a ``python -m decoder_worker --role pipeline --stage S`` TP group holding its
layer range, with the coordinator scheduling passes by streams (``--policy``, ``--n-d``,
``--streams``). :class:`LocalMesh` starts the
coordinator first (it binds and reports its real endpoints on the status pipe, so ``tcp://..:*``
needs no port guessing), then every worker rank, then waits for the handshake while watching
every child's exit. Shutdown is ordered: SIGTERM to the coordinator (it drains in-flight
requests and sends Shutdown to the workers), then the workers get a grace period, then SIGKILL.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from common.logs import ENV_RUN_ID, ENV_RUNS_DIR, new_run_id
from common.procs import (
    Child,
    ChildSpec,
    SignalWatch,
    StartupError,
    StatusPipe,
    reap,
    start_child,
    terminate_all,
    wait_for_ready,
)

TRANSPORTS = ("ipc", "tcp")
POLICIES = ("waa", "rra", "static", "continuous")


@dataclass(frozen=True)
class WorkerGroup:
    """``count`` workers of one role, each a TP group of ``tp_size`` rank processes.

    ``pipeline`` groups are one stage each (count 1) holding ``layer_range`` (and, for T5,
    ``encoder_layer_range``); None leaves the coordinator to split the layers evenly.
    An encoder or decoder group with a ``layer_range`` is one stage of a staged WAA plan's
    encoder or decoder pipeline (count 1; coordinator/waa_pipeline.py)."""

    role: str
    count: int
    tp_size: int = 1
    capacity: int = 256
    layer_range: tuple[int, int] | None = None
    encoder_layer_range: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.role not in ("encoder", "decoder", "pipeline"):
            raise ValueError(f"worker group role must be encoder, decoder or pipeline, got "
                             f"{self.role!r}")
        if self.count < 1 or self.tp_size < 1 or self.capacity < 1:
            raise ValueError(f"{self.role} group: count, tp_size and capacity must be >= 1")
        if (self.role == "pipeline" or self.layer_range is not None) and self.count != 1:
            raise ValueError("a pipeline group (or a WAA group with a layer range) is one "
                             "stage: count must be 1 (list a group per stage)")
        ranges = (self.layer_range, self.encoder_layer_range)
        if self.role != "pipeline" and self.encoder_layer_range is not None:
            raise ValueError("encoder_layer_range belongs to pipeline groups (T5 stages)")
        for rng in ranges:
            if rng is not None and (len(rng) != 2 or not 0 <= rng[0] < rng[1]):
                raise ValueError(f"a layer range is [lo, hi) with 0 <= lo < hi, got {rng!r}")


@dataclass(frozen=True)
class LaunchSpec:
    groups: tuple[WorkerGroup, ...]
    runs_path: Path = Path("runs")
    transport: str = "ipc"
    client_endpoint: str | None = None  # None: a fresh ipc path or tcp://127.0.0.1:*
    host: str = "127.0.0.1"
    model_shape: str = "tiny-llama"
    encode_batch: int = 16
    encode_cost_ms: float = 0.0
    encode_cost_ms_per_token: float = 0.0
    decode_cost_ms: float = 0.0
    stream_interval: int = 1
    publish_interval_ms: float = 1.0
    heartbeat_interval_s: float = 0.5
    heartbeat_timeout_s: float = 5.0
    drain_timeout_s: float = 10.0
    run_id: str = field(default_factory=new_run_id)
    # The real model (engine backend); None: the null model sized by model_shape.
    model: str | None = None
    dtype: str = "bfloat16"
    model_config: dict | None = None  # its ModelConfig.to_dict(): the coordinator's view of it
    tokenizer: str | None = None  # where the coordinator finds the tokenizer (text prompts)
    adjust_token_sum: str | None = None  # "LO,HI" bands of the dynamic B_E adjustment
    adjust_decode_batch: str | None = None
    policy: str = "waa"  # waa: encoder/decoder groups; rra/static/continuous: pipeline groups
    n_d: int = 1  # rra: decode passes per encode pass
    streams: int = 0  # pipeline policies: request groups in flight (0: one per stage)
    plan_file: str | None = None  # the plan JSON run: the coordinator's stats compare with it
    coordinator_args: tuple[str, ...] = ()  # extra coordinator flags (limits, CURVE keys)
    worker_args: tuple[str, ...] = ()  # extra flags for every worker rank

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        roles = {g.role for g in self.groups}
        if self.policy == "waa" and roles != {"encoder", "decoder"}:
            raise ValueError("a waa launch spec needs at least one encoder and one decoder "
                             "group")
        if self.policy != "waa":
            self._check_pipeline(roles)
        elif len({g.layer_range is None for g in self.groups}) > 1:
            raise ValueError("a staged WAA launch spec gives every encoder and decoder group a "
                             "layer_range (one stage each), or none")
        if (self.model is None) != (self.model_config is None):
            raise ValueError("a real-model launch spec needs both model and model_config (the "
                             "coordinator validates requests against the model's shape)")

    def _check_pipeline(self, roles: set[str]) -> None:
        if roles != {"pipeline"}:
            raise ValueError(f"a {self.policy} launch spec runs pipeline groups (one per "
                             f"stage) only, got {sorted(roles)}")
        for attr in ("layer_range", "encoder_layer_range"):
            if len({getattr(g, attr) is None for g in self.groups}) > 1:
                raise ValueError(f"give every pipeline group a {attr}, or none (even split)")
        if self.n_d < 1 or self.streams < 0:
            raise ValueError(f"need n_d >= 1 and streams >= 0, got {self.n_d}, {self.streams}")

    @property
    def stages(self) -> tuple[WorkerGroup, ...]:
        return tuple(g for g in self.groups if g.role == "pipeline")

    @property
    def waa_staged(self) -> bool:
        """A WAA plan whose groups hold layer ranges: two pipelines of stage workers."""
        return self.policy == "waa" and self.groups[0].layer_range is not None

    def stage_index(self, group: WorkerGroup, index: int) -> int:
        """A stage's global number: pipeline groups in order; staged WAA: encoders first."""
        if group.role == "decoder":
            return sum(g.role == "encoder" for g in self.groups) + index
        return index

    def pipeline_flags(self) -> list[str]:
        """The coordinator flags of a pipeline plan: policy, stages, layer ranges, knobs."""
        if self.waa_staged:
            return ["--streams", str(self.streams)] + [
                flag for role in ("encoder", "decoder") for flag in (
                    f"--waa-{role}-layers", ",".join(f"{g.layer_range[0]}:{g.layer_range[1]}"
                                                     for g in self.groups if g.role == role
                                                     and g.layer_range is not None))]
        if self.policy == "waa":
            return []
        flags = ["--policy", self.policy, "--pipeline-stages", str(len(self.stages)),
                 "--n-d", str(self.n_d), "--streams", str(self.streams)]
        for flag, attr in (("--stage-layers", "layer_range"),
                           ("--stage-encoder-layers", "encoder_layer_range")):
            ranges = [getattr(g, attr) for g in self.stages]
            if ranges[0] is not None:
                flags += [flag, ",".join(f"{lo}:{hi}" for lo, hi in ranges)]
        return flags

    @property
    def run_dir(self) -> Path:
        return self.runs_path / self.run_id

    def env(self) -> tuple[tuple[str, str], ...]:
        """Every child logs into the same run directory."""
        return ((ENV_RUN_ID, self.run_id), (ENV_RUNS_DIR, str(self.runs_path)))

    def num_processes(self, role: str) -> int:
        return sum(g.count * g.tp_size for g in self.groups if g.role == role)

    @property
    def model_config_file(self) -> Path:
        """Where the launcher writes ``model_config`` for the coordinator to read."""
        return self.run_dir / "model.json"

    @property
    def ipc_dir(self) -> str:
        """Socket files live in /tmp: unix socket paths are limited to 107 bytes."""
        return f"/tmp/exegpt-{self.run_id}"

    def _endpoint(self, name: str) -> str:
        if self.transport == "ipc":
            return f"ipc://{self.ipc_dir}/{name}"
        return f"tcp://{self.host}:*"

    def coordinator_child(self, status_fd: int) -> ChildSpec:
        argv = [sys.executable, "-m", "coordinator",
                "--client-endpoint", self.client_endpoint or self._endpoint("client"),
                "--worker-endpoint", self._endpoint("workers"),
                "--encoders", str(self.num_processes("encoder")),
                "--decoders", str(self.num_processes("decoder")),
                "--encode-batch", str(self.encode_batch), "--model-shape", self.model_shape,
                "--heartbeat-interval", str(self.heartbeat_interval_s),
                "--heartbeat-timeout", str(self.heartbeat_timeout_s),
                "--drain-timeout", str(self.drain_timeout_s),
                "--ready-fd", str(status_fd), *self.pipeline_flags()]
        if self.model_config is not None:
            argv += ["--model-config", str(self.model_config_file)]
        if self.tokenizer is not None:
            argv += ["--tokenizer", self.tokenizer]
        if self.adjust_token_sum is not None:
            argv += ["--adjust-token-sum", self.adjust_token_sum]
        if self.adjust_decode_batch is not None:
            argv += ["--adjust-decode-batch", self.adjust_decode_batch]
        if self.plan_file is not None:
            argv += ["--plan", str(self.plan_file)]
        argv += list(self.coordinator_args)
        return ChildSpec("coordinator", tuple(argv), env=self.env(), pass_fds=(status_fd,))

    def worker_children(self, worker_endpoint: str) -> list[ChildSpec]:
        out = []
        for position, group in enumerate(self.groups):
            prefix = "stage" if group.role == "pipeline" else group.role[:3]
            index = sum(g.count for g in self.groups[:position] if g.role == group.role)
            for i in range(index, index + group.count):
                tp_init = f"tcp://127.0.0.1:{free_port()}" if group.tp_size > 1 else None
                for rank in range(group.tp_size):
                    worker_id = f"{prefix}{i}" + (f".r{rank}" if group.tp_size > 1 else "")
                    out.append(self._worker_child(group, worker_id, rank, worker_endpoint,
                                                  tp_init, index=i))
        return out

    def _worker_child(self, group: WorkerGroup, worker_id: str, rank: int,
                      worker_endpoint: str, tp_init: str | None, index: int = 0) -> ChildSpec:
        """One rank's argv; ``index`` counts groups of its role (a pipeline group's stage)."""
        stage = group.role == "pipeline" or group.layer_range is not None
        module = "decoder_worker" if stage else f"{group.role}_worker"
        argv = [sys.executable, "-m", module, "--coordinator", worker_endpoint,
                "--worker-id", worker_id, "--tp-rank", str(rank),
                "--tp-size", str(group.tp_size), "--capacity", str(group.capacity),
                *(("--model", self.model, "--dtype", self.dtype) if self.model is not None
                  else ("--null-model",)),
                *(("--tp-init", tp_init) if tp_init is not None else ()),
                "--heartbeat-interval", str(self.heartbeat_interval_s),
                "--heartbeat-timeout", str(self.heartbeat_timeout_s)]
        if stage:
            kv = (f"ipc://{self.ipc_dir}/kv-{worker_id}"
                  if self.transport == "ipc" else f"tcp://{self.host}:*")
            argv += ["--role", "pipeline", "--stage", str(self.stage_index(group, index)),
                     "--kv-bind", kv, "--encode-cost-ms", str(self.encode_cost_ms),
                     "--encode-cost-ms-per-token", str(self.encode_cost_ms_per_token),
                     "--decode-cost-ms", str(self.decode_cost_ms)]
        elif group.role == "encoder":
            argv += ["--encode-cost-ms", str(self.encode_cost_ms),
                     "--encode-cost-ms-per-token", str(self.encode_cost_ms_per_token)]
            if "--adapt" in self.coordinator_args and group.tp_size == 1:
                # may be switched to the decoder role live (coordinator.adapt_roles)
                argv += ["--kv-bind", (f"ipc://{self.ipc_dir}/kv-{worker_id}"
                                       if self.transport == "ipc" else f"tcp://{self.host}:*"),
                         "--decode-cost-ms", str(self.decode_cost_ms)]
        else:
            kv = (f"ipc://{self.ipc_dir}/kv-{worker_id}"
                  if self.transport == "ipc" else f"tcp://{self.host}:*")
            argv += ["--kv-bind", kv, "--decode-cost-ms", str(self.decode_cost_ms),
                     "--stream-interval", str(self.stream_interval),
                     "--publish-interval-ms", str(self.publish_interval_ms)]
        argv += list(self.worker_args)
        return ChildSpec(f"{group.role}-{worker_id}", tuple(argv), env=self.env())


def free_port() -> int:
    """A loopback port free right now (the TP group's rendezvous binds it moments later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalMesh:
    """The processes of one local run; ``start()`` returns once the mesh serves."""

    def __init__(self, spec: LaunchSpec, startup_timeout_s: float = 60.0) -> None:
        self.spec = spec
        self.startup_timeout_s = startup_timeout_s
        self.children: list[Child] = []
        self.coordinator: Child | None = None
        self.client_endpoint = ""
        self.events: list[dict[str, object]] = []
        self.status: StatusPipe | None = None

    @property
    def workers(self) -> list[Child]:
        return [c for c in self.children if c is not self.coordinator]

    def start(self, signals: SignalWatch | None = None) -> str:
        """Start everything; raises StartupError (after cleaning up) if the mesh fails."""
        self.spec.run_dir.mkdir(parents=True, exist_ok=True)
        if self.spec.model_config is not None:
            self.spec.model_config_file.write_text(json.dumps(self.spec.model_config))
        self.status = StatusPipe()
        try:
            self._start(signals)
        except BaseException:
            self.stop(grace_s=2.0)
            raise
        return self.client_endpoint

    def _start(self, signals: SignalWatch | None) -> None:
        assert self.status is not None
        self.coordinator = start_child(self.spec.coordinator_child(self.status.write_fd),
                                       self.spec.run_dir)
        self.children.append(self.coordinator)
        self.status.close_writer()
        bound = wait_for_ready(self.children, self.status, signals, self.startup_timeout_s,
                               self.events.append, until="bound")
        pgid = self.coordinator.pid
        for child in self.spec.worker_children(str(bound["worker_endpoint"])):
            self.children.append(start_child(child, self.spec.run_dir, process_group=pgid))
        ready = wait_for_ready(self.children, self.status, signals, self.startup_timeout_s,
                               self.events.append)
        self.client_endpoint = str(ready["client_endpoint"])

    def stop(self, grace_s: float = 5.0) -> list[str]:
        """Coordinator first (it drains and tells workers to stop), then the workers."""
        killed: list[str] = []
        if self.coordinator is not None and self.coordinator.poll() is None:
            terminate_all([self.coordinator], self.spec.drain_timeout_s + grace_s)
        killed += reap(self.workers, grace_s)
        killed += terminate_all(self.workers, grace_s)
        if self.status is not None:
            self.status.close()
        if self.spec.transport == "ipc":
            shutil.rmtree(self.spec.ipc_dir, ignore_errors=True)
        return killed

    def __enter__(self) -> LocalMesh:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["LaunchSpec", "LocalMesh", "StartupError", "WorkerGroup"]
