"""Coordinator settings: one frozen value from args or environment (docker-compose uses env)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"EXEGPT_{name}", default)


def check_endpoint(endpoint: str, what: str) -> None:
    if not endpoint.startswith(("ipc://", "tcp://", "inproc://")):
        raise ValueError(f"{what} endpoint {endpoint!r} must start with ipc:// or tcp://")


@dataclass(frozen=True)
class CoordinatorConfig:
    """Where to listen, what mesh to expect and the control-plane limits.

    ``heartbeat_timeout_s`` is how long a worker may stay silent before its requests fail;
    ``drain_timeout_s`` is how long SIGTERM waits for in-flight requests before erroring them.
    """

    client_endpoint: str
    worker_endpoint: str
    num_encoders: int = 1
    num_decoders: int = 1
    max_encode_batch: int = 16
    max_outstanding_batches: int = 2
    max_queued: int = 100_000
    max_client_requests: int = 10_000  # in flight (queued or running) per client connection
    max_prompt_tokens: int = 8192
    max_new_tokens: int = 8192
    heartbeat_interval_s: float = 0.5
    heartbeat_timeout_s: float = 5.0
    drain_timeout_s: float = 10.0
    kv_timeout_s: float = 30.0  # encode batch sent -> first token; past it: re-run (KV lost)
    model_shape: str = "tiny-llama"
    model_config: str | None = None  # JSON file of the served model's ModelConfig
    tokenizer: str | None = None  # the model's HF directory or .gguf (text prompts)
    policy: str = "waa"  # waa: encoder + decoder workers; rra/static/continuous: stage workers
    pipeline_stages: int = 0  # pipeline policies: stage workers (TP groups) to wait for
    stage_layers: str | None = None  # "0:15,15:30": decoder layers per stage (None: even split)
    stage_encoder_layers: str | None = None  # T5: encoder layers per stage (None: even split)
    n_d: int = 1  # rra: decode passes per encode pass (the plan's N_D)
    streams: int = 0  # pipeline policies: request groups in flight (0: one per stage)
    # waa with layer ranges (coordinator.waa_pipeline): "0:7,7:14" per encoder / decoder stage
    waa_encoder_layers: str | None = None
    waa_decoder_layers: str | None = None
    adjust_token_sum: str | None = None  # "LO,HI": the plan's band for an encode batch's tokens
    adjust_decode_batch: str | None = None  # "LO,HI": the plan's band for the decode batch
    plan: str | None = None  # the plan JSON served; stats set its predictions beside measured
    profile: str | None = None  # the profile the plan was made from (JSON or analytic:GPU:MODEL)
    adapt: bool = False  # watch for workload drift, re-plan, switch knobs (coordinator/adapt.py)
    adapt_options: str | None = None  # drift thresholds "key=value,..." (coordinator.drift)
    ready_fd: int | None = None
    curve_server_key: str | None = None  # the server's key_secret file (exegpt keys): CURVE on
    curve_allow: str | None = None  # ... the client port, admitting the public keys in this dir
    curve_worker_allow: str | None = None  # dir of worker public keys: CURVE on the worker port

    def __post_init__(self) -> None:
        check_endpoint(self.client_endpoint, "client")
        check_endpoint(self.worker_endpoint, "worker")
        for name in ("num_encoders", "num_decoders"):
            if self.policy == "waa" and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (the mesh needs both roles)")
        for name in ("max_encode_batch", "max_outstanding_batches", "max_queued",
                     "max_client_requests", "max_prompt_tokens", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.heartbeat_interval_s < self.heartbeat_timeout_s:
            raise ValueError("need 0 < heartbeat_interval_s < heartbeat_timeout_s "
                             f"(got {self.heartbeat_interval_s}, {self.heartbeat_timeout_s})")
        if self.kv_timeout_s <= 0:
            raise ValueError("kv_timeout_s must be > 0 (seconds from an encode batch to its "
                             "requests' first tokens)")
        if self.drain_timeout_s < 0:
            raise ValueError("drain_timeout_s must be >= 0")
        check_pipeline(self)
        from coordinator.adjust import Band

        Band.parse(self.adjust_token_sum)  # a malformed band fails at startup, with its text
        Band.parse(self.adjust_decode_batch)
        if self.adapt:
            from coordinator.drift import DriftConfig

            if not self.plan or not self.profile:
                raise ValueError("--adapt needs --plan and --profile (the plan served and the "
                                 "profile it was made from)")
            DriftConfig.parse(self.adapt_options)  # bad thresholds fail at startup
        self._check_curve()

    def _check_curve(self) -> None:
        if (self.curve_allow or self.curve_worker_allow) and not self.curve_server_key:
            raise ValueError("--curve-allow / --curve-worker-allow need --curve-server-key "
                             "(the server.key_secret file `exegpt keys` wrote)")
        if self.curve_server_key and not (self.curve_allow or self.curve_worker_allow):
            raise ValueError("--curve-server-key needs --curve-allow DIR (the client public "
                             "keys to admit; `exegpt keys` writes DIR/allow)")
        for name in ("curve_allow", "curve_worker_allow"):
            path = getattr(self, name)
            if path and not os.path.isdir(path):
                raise ValueError(f"{name}: {path!r} is not a directory of public keys")
        if self.curve_server_key and not os.path.isfile(self.curve_server_key):
            raise ValueError(f"curve_server_key: no such file {self.curve_server_key!r}")


POLICIES = ("waa", "rra", "static", "continuous")


def parse_ranges(text: str | None, what: str) -> tuple[tuple[int, int], ...] | None:
    """``"0:15,15:30"`` -> ((0, 15), (15, 30)); None stays None (an even split)."""
    if text is None:
        return None
    out = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition(":")
        if not sep or not lo.strip().isdigit() or not hi.strip().isdigit() or int(lo) > int(hi):
            raise ValueError(f"{what} {text!r}: expected LO:HI[,LO:HI...] with LO <= HI, "
                             "e.g. 0:15,15:30")
        out.append((int(lo), int(hi)))
    return tuple(out)


def check_pipeline(cfg: CoordinatorConfig) -> None:
    """A pipeline policy's stage count, layer ranges, N_D and streams agree (the model's layer
    count is checked once the model is known: coordinator.pipeline_driver)."""
    if cfg.policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {cfg.policy!r}")
    if cfg.n_d < 1 or cfg.streams < 0 or cfg.pipeline_stages < 0:
        raise ValueError("need n_d >= 1, streams >= 0 and pipeline_stages >= 0")
    if cfg.policy == "waa":
        for text, what in ((cfg.waa_encoder_layers, "waa_encoder_layers"),
                           (cfg.waa_decoder_layers, "waa_decoder_layers")):
            parse_ranges(text, what)
        if (cfg.waa_encoder_layers is None) != (cfg.waa_decoder_layers is None):
            raise ValueError("a staged WAA mesh needs both --waa-encoder-layers and "
                             "--waa-decoder-layers")
        return
    for text, what in ((cfg.stage_layers, "stage_layers"),
                       (cfg.stage_encoder_layers, "stage_encoder_layers")):
        ranges = parse_ranges(text, what)
        if ranges is not None and len(ranges) != cfg.pipeline_stages:
            raise ValueError(f"{what} names {len(ranges)} stages but pipeline_stages is "
                             f"{cfg.pipeline_stages}")
    if cfg.pipeline_stages < 1:
        raise ValueError(f"policy {cfg.policy} runs on stage workers: pass --pipeline-stages "
                         "(and optionally --stage-layers)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m coordinator``; each defaults to ``EXEGPT_<NAME>`` when set."""
    parser.epilog = ("Environment: each --some-flag defaults to EXEGPT_SOME_FLAG when set; "
                     "--client-endpoint reads EXEGPT_COORDINATOR_ENDPOINT (the variable clients "
                     "use too) and --worker-endpoint EXEGPT_WORKER_ENDPOINT.")
    add = parser.add_argument

    def opt(flag: str, default: Any = None, **kw: Any) -> None:
        """``flag`` defaulting to EXEGPT_<FLAG> when set (argparse parses a string default with
        ``type``, so a bad value is a usage error), else to ``default``."""
        raw = _env(flag.lstrip("-").upper().replace("-", "_"))
        add(flag, default=default if raw in (None, "") else raw, **kw)

    add("--client-endpoint", default=_env("COORDINATOR_ENDPOINT", "tcp://127.0.0.1:5555"),
        help="where clients connect (bind); tcp://host:* picks a free port")
    opt("--worker-endpoint", "tcp://127.0.0.1:5556", help="where workers connect (bind)")
    opt("--encoders", 1, type=int,
        help="encoder workers (TP ranks count separately) to wait for before serving")
    opt("--decoders", 1, type=int)
    opt("--encode-batch", 16, type=int, help="max requests per encode batch (the plan's B_E)")
    opt("--max-queued", 100000, type=int,
        help="requests waiting for an encoder; beyond it Submit gets 'overloaded' with a "
             "retry-after estimated from the drain rate")
    opt("--max-client-requests", 10000, type=int,
        help="requests in flight per client connection (overloaded beyond it)")
    opt("--max-prompt-tokens", 8192, type=int)
    opt("--max-new-tokens", 8192, type=int)
    opt("--curve-server-key",
        help="server.key_secret from `exegpt keys`: the client port speaks CURVE and admits "
             "only the public keys in --curve-allow")
    opt("--curve-allow",
        help="directory of client public keys (*.key) allowed on the client port")
    opt("--curve-worker-allow",
        help="directory of worker public keys: the worker port speaks CURVE too")
    opt("--heartbeat-interval", 0.5, type=float)
    opt("--heartbeat-timeout", 5.0, type=float)
    opt("--drain-timeout", 10.0, type=float)
    opt("--kv-timeout", 30.0, type=float,
        help="seconds from sending a request's encode batch to its first token; past it the "
             "KV handoff counts as lost: the request is re-run (freed on both sides)")
    opt("--model-shape", "tiny-llama", help="ModelConfig preset the workers size their work by")
    opt("--model-config",
        help="JSON file with the served model's ModelConfig (overrides --model-shape)")
    opt("--tokenizer",
        help="HF model directory (tokenizer.json) or .gguf whose tokenizer turns text "
             "prompts into ids and outputs back into text")
    opt("--adjust-token-sum",
        help="LO,HI: keep each encode batch's input-token sum in this band by adjusting B_E "
             "(the plan's adjust.token_sum)")
    opt("--adjust-decode-batch",
        help="LO,HI: keep the decoders' running batch in this band by adjusting B_E "
             "(the plan's adjust.decode_batch)")
    opt("--policy", "waa", choices=POLICIES,
        help="waa: encoder and decoder workers; rra/static/continuous: a pipeline of stage "
             "workers (python -m decoder_worker --role pipeline) scheduled by streams")
    opt("--pipeline-stages", 0, type=int,
        help="pipeline policies: how many stages (TP groups) to wait for")
    opt("--stage-layers",
        help="LO:HI,...: decoder layers of each stage (default: an even split)")
    opt("--stage-encoder-layers",
        help="LO:HI,...: T5 encoder layers of each stage (default: an even split)")
    opt("--n-d", 1, type=int, help="rra: decode passes per encode pass (the plan's N_D)")
    opt("--streams", 0, type=int,
        help="pipeline policies: request groups in flight (default: one per stage)")
    opt("--waa-encoder-layers",
        help="waa: LO:HI,... layers of each encoder pipeline stage (stage workers; needs "
             "--waa-decoder-layers)")
    opt("--waa-decoder-layers",
        help="waa: LO:HI,... layers of each decoder pipeline stage; --streams is B_m, the "
             "decode micro-batches in flight")
    opt("--plan",
        help="the plan JSON this mesh runs (`exegpt plan --out`): stats report its predicted "
             "throughput/latency beside the measured ones")
    opt("--profile",
        help="the profile --plan was made from (JSON, or analytic:GPU:MODEL); --adapt re-plans "
             "with it")
    add("--adapt", action="store_true", default=_env("ADAPT", "") not in ("", "0"),
        help="detect workload drift and switch the plan's knobs live (docs/adaptation.md)")
    opt("--adapt-options",
        help="drift thresholds, e.g. window=256,alpha=1e-5,mean_shift=0.15,min_dwell_s=10")
    add("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)


def from_args(args: argparse.Namespace) -> CoordinatorConfig:
    return CoordinatorConfig(
        client_endpoint=args.client_endpoint, worker_endpoint=args.worker_endpoint,
        num_encoders=args.encoders, num_decoders=args.decoders,
        max_encode_batch=args.encode_batch, max_queued=args.max_queued,
        max_client_requests=args.max_client_requests,
        max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
        curve_server_key=args.curve_server_key, curve_allow=args.curve_allow,
        curve_worker_allow=args.curve_worker_allow,
        heartbeat_interval_s=args.heartbeat_interval, heartbeat_timeout_s=args.heartbeat_timeout,
        drain_timeout_s=args.drain_timeout, kv_timeout_s=args.kv_timeout,
        model_shape=args.model_shape,
        model_config=args.model_config,
        tokenizer=args.tokenizer, adjust_token_sum=args.adjust_token_sum,
        adjust_decode_batch=args.adjust_decode_batch, ready_fd=args.ready_fd, plan=args.plan,
        profile=args.profile, adapt=args.adapt, adapt_options=args.adapt_options,
        policy=args.policy, pipeline_stages=args.pipeline_stages, stage_layers=args.stage_layers,
        stage_encoder_layers=args.stage_encoder_layers, n_d=args.n_d, streams=args.streams,
        waa_encoder_layers=args.waa_encoder_layers, waa_decoder_layers=args.waa_decoder_layers,
    )
