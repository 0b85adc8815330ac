"""Worker settings (every role): one frozen value from args or ``EXEGPT_*`` environment.

The same flags start a worker under ``exegpt serve`` and as a docker-compose service; the
coordinator's Assign then supplies what the whole mesh must agree on (the model shape).
"""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass

BACKENDS = ("null", "engine")
ROLES = ("encoder", "decoder", "pipeline")


def _env(name: str, default: str) -> str:
    return os.environ.get(f"EXEGPT_{name}", default)


@dataclass(frozen=True)
class WorkerConfig:
    """``capacity``: decoder = max running sequences; encoder = max requests per batch.
    ``stage``: a pipeline stage worker's place in its pipeline (0 = first)."""

    role: str
    coordinator: str
    worker_id: str
    tp_rank: int = 0
    tp_size: int = 1
    device: str = "cpu"
    capacity: int = 256
    kv_bind: str | None = None
    kv_advertise: str | None = None
    heartbeat_interval_s: float = 0.5
    heartbeat_timeout_s: float = 5.0
    startup_timeout_s: float = 60.0
    backend: str = "null"
    encode_cost_ms: float = 0.0
    encode_cost_ms_per_token: float = 0.0
    decode_cost_ms: float = 0.0
    stream_interval: int = 1
    publish_interval_ms: float = 1.0
    tp_init: str | None = None  # gloo rendezvous of this worker's TP group (tcp://host:port)
    model: str | None = None  # engine backend: HF directory, .gguf file or preset name
    dtype: str = "bfloat16"
    stage: int | None = None
    curve_server_public: str | None = None  # CURVE to the coordinator: its server.key ...
    curve_key: str | None = None  # ... and this worker's .key_secret (exegpt keys --workers)
    curve_mesh_key: str | None = None  # keys/mesh.key_secret: CURVE on the KV endpoints

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"worker role must be one of {ROLES}, got {self.role!r}")
        if self.role == "pipeline" and (self.stage is None or self.stage < 0):
            raise ValueError("a pipeline worker needs --stage S (0 = the first stage), got "
                             f"{self.stage!r}")
        if not self.coordinator.startswith(("ipc://", "tcp://", "inproc://")):
            raise ValueError(f"coordinator endpoint {self.coordinator!r} must be ipc:// or tcp://")
        if bool(self.curve_server_public) != bool(self.curve_key):
            raise ValueError("CURVE to the coordinator needs both --curve-coordinator-key "
                             "(keys/server.key) and --curve-key (keys/workers/<w>.key_secret)")
        if self.role in ("decoder", "pipeline") and not self.kv_bind:
            raise ValueError(f"a {self.role} worker needs --kv-bind (where encoders send KV or "
                             "the previous stage sends hidden rows), e.g. "
                             "tcp://0.0.0.0:* or ipc:///tmp/kv-dec0")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"need 0 <= tp_rank < tp_size, got {self.tp_rank}/{self.tp_size}")
        if self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {self.capacity}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; available: {BACKENDS}")
        if self.backend == "engine" and not self.model:
            raise ValueError("the engine backend needs --model (an HF directory, a .gguf file "
                             "or a preset name); or pass --null-model")
        if self.backend == "engine" and self.tp_size > 1 and not self.tp_init:
            raise ValueError("a tp_size > 1 worker needs --tp-init tcp://HOST:PORT, the "
                             "rendezvous address shared by the ranks of its group")
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"dtype must be bfloat16 or float32, got {self.dtype!r}")
        if min(self.encode_cost_ms, self.encode_cost_ms_per_token, self.decode_cost_ms) < 0:
            raise ValueError("costs must be >= 0 ms")
        if self.publish_interval_ms < 0:
            raise ValueError("publish_interval_ms must be >= 0")
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {self.stream_interval}")
        if not 0 < self.heartbeat_interval_s < self.heartbeat_timeout_s:
            raise ValueError("need 0 < heartbeat interval < heartbeat timeout")


ENV_HELP = ("Environment: each --some-flag defaults to EXEGPT_SOME_FLAG when set (what "
            "docker-compose uses); --coordinator reads EXEGPT_WORKER_ENDPOINT and --null-model "
            "EXEGPT_BACKEND=null. Logs: runs/<EXEGPT_RUN_ID>/<role>-<worker-id>.jsonl under "
            "EXEGPT_RUNS_DIR (default ./runs).")


def add_arguments(parser: argparse.ArgumentParser, role: str) -> None:
    parser.epilog = ENV_HELP
    add = parser.add_argument
    add("--coordinator", default=_env("WORKER_ENDPOINT", "tcp://127.0.0.1:5556"),
        help="the coordinator's worker endpoint (connect)")
    add("--worker-id", default=_env("WORKER_ID", f"{role[:3]}-{socket.gethostname()}-"
                                                 f"{os.getpid()}"))
    add("--tp-rank", type=int, default=int(_env("TP_RANK", "0")))
    add("--tp-size", type=int, default=int(_env("TP_SIZE", "1")))
    add("--tp-init", default=_env("TP_INIT", "") or None,
        help="tcp://HOST:PORT where the ranks of this worker's TP group meet (tp_size > 1)")
    add("--device", default=_env("DEVICE", "cpu"))
    add("--capacity", type=int, default=int(_env("CAPACITY", "256")),
        help="decoder: max running sequences; encoder: max requests per batch")
    add("--heartbeat-interval", type=float, default=float(_env("HEARTBEAT_INTERVAL", "0.5")))
    add("--heartbeat-timeout", type=float, default=float(_env("HEARTBEAT_TIMEOUT", "5")),
        help="exit when the coordinator is silent this long")
    add("--startup-timeout", type=float, default=float(_env("STARTUP_TIMEOUT", "60")))
    add("--curve-coordinator-key", default=_env("CURVE_COORDINATOR_KEY", "") or None,
        help="the coordinator's public key (server.key) when its worker port uses CURVE")
    add("--curve-key", default=_env("CURVE_KEY", "") or None,
        help="this worker's key pair (.key_secret from `exegpt keys --workers N`)")
    add("--curve-mesh-key", default=_env("CURVE_MESH_KEY", "") or None,
        help="the mesh pair (keys/mesh.key_secret): CURVE between workers' KV endpoints; "
             "every worker of the mesh needs it")
    add("--null-model", action="store_const", const="null", dest="backend",
        default=_env("BACKEND", ""), help="no math: real-sized KV, deterministic tokens")
    add("--model", default=_env("MODEL", "") or None,
        help="run the real model (engine backend): HF directory, .gguf file or preset name")
    add("--dtype", default=_env("DTYPE", "bfloat16"), choices=("bfloat16", "float32"),
        help="engine backend compute dtype (float32 for exactness checks)")
    if role == "pipeline":
        add("--stage", type=int, default=int(_env("STAGE", "-1")),
            help="this worker's pipeline stage (0 = first; the plan's stage order)")
    if role in ("encoder", "pipeline"):
        add("--encode-cost-ms", type=float, default=float(_env("ENCODE_COST_MS", "0")))
        add("--encode-cost-ms-per-token", type=float,
            default=float(_env("ENCODE_COST_MS_PER_TOKEN", "0")))
    if role == "encoder":  # an encoder that may become a decoder (adapt: role switch)
        add("--kv-bind", default=_env("KV_BIND", "") or None,
            help="bind a KV endpoint too, so the coordinator may switch this worker to the "
                 "decoder role while serving (docs/adaptation.md); default: none")
        add("--kv-advertise", default=os.environ.get("EXEGPT_KV_ADVERTISE"),
            help="the endpoint encoders connect to, if not the bound one")
        add("--decode-cost-ms", type=float, default=float(_env("DECODE_COST_MS", "0")))
    if role == "decoder":  # (null model) costs of the encoder role, after a role switch
        add("--encode-cost-ms", type=float, default=float(_env("ENCODE_COST_MS", "0")))
        add("--encode-cost-ms-per-token", type=float,
            default=float(_env("ENCODE_COST_MS_PER_TOKEN", "0")))
    if role in ("decoder", "pipeline"):
        add("--kv-bind", default=_env("KV_BIND", "tcp://127.0.0.1:*"),
            help="where encoders send KV (bind); tcp://host:* picks a free port")
        add("--kv-advertise", default=os.environ.get("EXEGPT_KV_ADVERTISE"),
            help="the endpoint encoders connect to, if not the bound one")
        add("--decode-cost-ms", type=float, default=float(_env("DECODE_COST_MS", "0")))
        add("--stream-interval", type=int, default=int(_env("STREAM_INTERVAL", "1")),
            help="publish a sequence's tokens every N iterations (first and last at once)")
        add("--publish-interval-ms", type=float,
            default=float(_env("PUBLISH_INTERVAL_MS", "1")),
            help="merge the tokens of iterations faster than this (0: publish every one)")


def from_args(args: argparse.Namespace, role: str) -> WorkerConfig:
    return WorkerConfig(
        role=role, coordinator=args.coordinator, worker_id=args.worker_id,
        tp_rank=args.tp_rank, tp_size=args.tp_size, device=args.device, capacity=args.capacity,
        kv_bind=getattr(args, "kv_bind", None), kv_advertise=getattr(args, "kv_advertise", None),
        heartbeat_interval_s=args.heartbeat_interval, heartbeat_timeout_s=args.heartbeat_timeout,
        startup_timeout_s=args.startup_timeout,
        backend=args.backend or ("engine" if args.model else "null"),
        model=args.model, dtype=args.dtype, tp_init=args.tp_init,
        encode_cost_ms=getattr(args, "encode_cost_ms", 0.0),
        encode_cost_ms_per_token=getattr(args, "encode_cost_ms_per_token", 0.0),
        decode_cost_ms=getattr(args, "decode_cost_ms", 0.0),
        stream_interval=getattr(args, "stream_interval", 1),
        publish_interval_ms=getattr(args, "publish_interval_ms", 1.0),
        stage=getattr(args, "stage", None),
        curve_server_public=args.curve_coordinator_key, curve_key=args.curve_key,
        curve_mesh_key=args.curve_mesh_key,
    )
