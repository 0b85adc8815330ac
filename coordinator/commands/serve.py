"""`exegpt serve`: start a coordinator and its workers as local processes and supervise them.

Startup fails fast (with the dead process's stderr tail) when any process dies before the
handshake completes; afterwards the launcher reports worker exits and losses, and SIGINT /
SIGTERM stop the mesh in order (coordinator drains, then workers, then SIGKILL stragglers).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from common.logs import new_run_id
from common.models.config import ModelConfig


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="start a coordinator and workers (local processes)",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--null-model", action="store_true",
                   help="workers do no math: real-sized KV, deterministic tokens")
    p.add_argument("--model", default=None,
                   help="serve this model for real: an HF directory, a .gguf file or a preset "
                        "name (random weights)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="compute dtype of the real model (default bfloat16)")
    p.add_argument("--plan", type=Path, default=None,
                   help="run this plan (`exegpt plan --out`): its worker groups, B_E and B_E "
                        "adjustment bands replace --encoders/--decoders/--*-tp/--encode-batch")
    p.add_argument("--workload", default=None,
                   help="with --model, --latency-bound and --workers: plan for this workload "
                        "(`exegpt plan --help`) from this machine's cached (else measured) "
                        "profile, then serve the plan")
    p.add_argument("--latency-bound", type=float, default=None, help="seconds (auto plan)")
    p.add_argument("--profile", default=None,
                   help="the profile the plan was made from (JSON, or analytic:GPU:MODEL): "
                        "--adapt re-plans with it (an auto plan: the cached profile)")
    p.add_argument("--adapt", action="store_true",
                   help="watch the served lengths; on drift re-plan in the background and "
                        "switch the plan's knobs live (needs a plan; docs/adaptation.md)")
    p.add_argument("--adapt-options", default=None,
                   help="drift thresholds key=value,... (e.g. window=128,min_dwell_s=5)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (auto plan; default 2, or 1 on a 1-core machine)")
    p.add_argument("--policy", default="waa", choices=SERVE_POLICIES,
                   help="auto plan: the policies it may choose from (auto: any). Without a "
                        "plan: waa runs --encoders/--decoders; rra, static and continuous run "
                        "--stages stage workers with --encode-batch as B and --n-d")
    p.add_argument("--stages", type=int, default=2,
                   help="pipeline policies without a plan: stage workers (even layer split)")
    p.add_argument("--stage-tp", type=int, default=1, help="tp_size of each pipeline stage")
    p.add_argument("--n-d", type=int, default=4,
                   help="rra without a plan: decode passes per encode pass (N_D)")
    p.add_argument("--streams", type=int, default=0,
                   help="pipeline policies without a plan: request groups in flight "
                        "(default: one per stage)")
    p.add_argument("--encoders", type=int, default=1, help="encoder workers (default 1)")
    p.add_argument("--decoders", type=int, default=1, help="decoder workers (default 1)")
    p.add_argument("--encoder-tp", type=int, default=1, help="tp_size of each encoder")
    p.add_argument("--decoder-tp", type=int, default=1, help="tp_size of each decoder")
    p.add_argument("--decoder-capacity", type=int, default=256,
                   help="max running sequences per decoder")
    p.add_argument("--transport", choices=("ipc", "tcp"), default="ipc")
    p.add_argument("--host", default="127.0.0.1", help="tcp interface to bind")
    p.add_argument("--endpoint", default=None,
                   help="client endpoint (default: ipc path in /tmp or tcp://HOST:free-port)")
    p.add_argument("--model-shape", default="smollm2-135m", choices=ModelConfig.preset_names(),
                   help="model preset that sizes KV payloads and the vocabulary")
    p.add_argument("--encode-batch", type=int, default=16, help="max requests per encode batch")
    p.add_argument("--encode-cost-ms", type=float, default=0.0, help="null encode cost per batch")
    p.add_argument("--encode-cost-ms-per-token", type=float, default=0.0)
    p.add_argument("--decode-cost-ms", type=float, default=0.0,
                   help="null decode cost per iteration")
    p.add_argument("--publish-interval-ms", type=float, default=1.0,
                   help="decoders merge the tokens of iterations faster than this")
    p.add_argument("--heartbeat-interval", type=float, default=0.5)
    p.add_argument("--heartbeat-timeout", type=float, default=5.0)
    p.add_argument("--drain-timeout", type=float, default=10.0,
                   help="on SIGTERM, how long in-flight requests may take to finish")
    p.add_argument("--startup-timeout", type=float, default=60.0)
    p.add_argument("--runs-dir", type=Path, default=Path("runs"), help="parent of run dirs")
    p.set_defaults(func=run)


SERVE_POLICIES = ("waa", "waa-c", "waa-m", "rra", "static", "continuous", "auto")
PIPELINE_POLICIES = ("rra", "static", "continuous")


def default_workers() -> int:
    """An auto plan's worker count unless --workers: `exegpt up`'s default."""
    return min(2, os.cpu_count() or 1)


def spec_from_args(args: argparse.Namespace) -> Any:
    from coordinator.launch import LaunchSpec, WorkerGroup

    model: dict[str, Any] = {}
    if not args.null_model:
        model = model_fields(args.model)
    plan = load_plan(args, model.get("model_config"))
    if plan is None and (args.adapt or args.profile or args.adapt_options):
        raise ValueError("--adapt, --adapt-options and --profile need a plan (--plan FILE, or "
                         "--workload/--latency-bound for an auto plan)")
    if plan is not None:
        from coordinator.plan_launch import plan_fields

        fields = plan_fields(plan, null_model=args.null_model,
                             decoder_capacity=args.decoder_capacity)
        run_id = new_run_id()
        plan_file = plan_path(args, plan, run_id)
        return LaunchSpec(**model, **fields, dtype=args.dtype, runs_path=args.runs_dir,
                          run_id=run_id, plan_file=plan_file,  # stats compare with it
                          coordinator_args=adapt_flags(args),
                          encode_cost_ms=args.encode_cost_ms,
                          encode_cost_ms_per_token=args.encode_cost_ms_per_token,
                          decode_cost_ms=args.decode_cost_ms,
                          transport=args.transport, client_endpoint=args.endpoint,
                          host=args.host, model_shape=args.model_shape,
                          publish_interval_ms=args.publish_interval_ms,
                          heartbeat_interval_s=args.heartbeat_interval,
                          heartbeat_timeout_s=args.heartbeat_timeout,
                          drain_timeout_s=args.drain_timeout)
    pipeline = args.policy in PIPELINE_POLICIES
    if pipeline and args.stages < 1:
        raise ValueError(f"--stages must be >= 1, got {args.stages}")
    groups = (tuple(WorkerGroup("pipeline", 1, args.stage_tp) for _ in range(args.stages))
              if pipeline else
              (WorkerGroup("encoder", args.encoders, args.encoder_tp),
               WorkerGroup("decoder", args.decoders, args.decoder_tp, args.decoder_capacity)))
    knobs = ({"policy": args.policy, "n_d": args.n_d, "streams": args.streams}
             if pipeline else {})
    return LaunchSpec(
        **model, **knobs, dtype=args.dtype, groups=groups,
        runs_path=args.runs_dir, transport=args.transport, client_endpoint=args.endpoint,
        host=args.host, model_shape=args.model_shape, encode_batch=args.encode_batch,
        encode_cost_ms=args.encode_cost_ms,
        encode_cost_ms_per_token=args.encode_cost_ms_per_token,
        decode_cost_ms=args.decode_cost_ms, publish_interval_ms=args.publish_interval_ms,
        heartbeat_interval_s=args.heartbeat_interval,
        heartbeat_timeout_s=args.heartbeat_timeout, drain_timeout_s=args.drain_timeout)


def plan_path(args: argparse.Namespace, plan: Any, run_id: str) -> str:
    """The plan JSON the coordinator reads (stats, --adapt): --plan's file, or the auto plan
    written into the run directory."""
    if args.plan is not None:
        return str(args.plan.resolve())
    path = args.runs_dir / run_id / "plan.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(plan.to_json())
    return str(path.resolve())


def adapt_flags(args: argparse.Namespace) -> tuple[str, ...]:
    """The coordinator's --profile / --adapt / --adapt-options (checked here, not after the
    mesh started: a bad threshold or a missing profile is a usage error)."""
    from coordinator.drift import DriftConfig

    profile = args.profile
    if profile is not None and not str(profile).startswith("analytic:"):
        if not Path(profile).is_file():
            raise ValueError(f"--profile {profile}: no such file (a profile JSON or "
                             "analytic:GPU:MODEL)")
        profile = str(Path(profile).resolve())
    if args.adapt and profile is None:
        raise ValueError("--adapt needs --profile (the profile the plan was made from; an "
                         "auto plan passes its own)")
    DriftConfig.parse(args.adapt_options)
    flags = ("--profile", profile) if profile is not None else ()
    if args.adapt:
        flags += ("--adapt",)
        if args.adapt_options:
            flags += ("--adapt-options", args.adapt_options)
    return flags


def run(args: argparse.Namespace) -> int:
    from common.procs import SignalWatch, StartupError
    from coordinator.launch import LocalMesh

    if args.null_model == (args.model is not None):
        print("exegpt serve: pass exactly one of --model PATH (the real model) or --null-model",
              file=sys.stderr)
        return 2
    try:
        spec = spec_from_args(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"exegpt serve: {exc}", file=sys.stderr)
        return 2
    signals = SignalWatch()
    mesh = LocalMesh(spec, startup_timeout_s=args.startup_timeout)
    try:
        endpoint = mesh.start(signals)
    except StartupError as exc:
        print(f"exegpt serve: startup failed: {exc}", file=sys.stderr)
        return 1
    what = f"{spec.model}, {spec.dtype}" if spec.model else f"null model, {spec.model_shape}"
    print(f"exegpt serving ({what}) on {endpoint}\n"
          f"  run {spec.run_id}: logs in {spec.run_dir} (exegpt logs -f --run {spec.run_id})\n"
          f"  clients: Client({endpoint!r}) or export EXEGPT_COORDINATOR_ENDPOINT={endpoint}\n"
          f"  Ctrl-C stops (in-flight requests drain for up to {spec.drain_timeout_s:g} s)",
          flush=True)
    try:
        return supervise(mesh, signals)
    finally:
        killed = mesh.stop(grace_s=30.0 if spec.model else 5.0)  # torch exits take seconds
        if killed:
            print(f"exegpt serve: killed unresponsive {', '.join(killed)}", file=sys.stderr)
        signals.close()


def load_plan(args: argparse.Namespace, model_config: dict[str, Any] | None) -> Any:
    """The plan to run: --plan FILE, an auto plan (--workload ...), or None (flags)."""
    from coordinator.planner.plan import Plan

    auto = (args.workload, args.latency_bound, args.workers)
    if args.plan is not None and any(x is not None for x in auto):
        raise ValueError("pass --plan or --workload/--latency-bound/--workers, not both")
    if args.plan is not None:
        try:
            plan = Plan.from_json(args.plan.read_text())
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"cannot read plan {args.plan}: {exc}") from exc
    elif any(x is not None for x in auto):
        if None in auto[:2] or model_config is None:
            raise ValueError("an auto plan needs --model, --workload and --latency-bound "
                             "(and optionally --workers)")
        plan = auto_plan(args, model_config)
    else:
        return None
    if model_config is not None:
        served = {k: v for k, v in model_config.items() if k != "name"}
        planned = {k: v for k, v in plan.model.items() if k != "name"}
        if served != planned:
            raise ValueError(f"the plan was made for another model shape than {args.model}; "
                             "re-plan with this model's profile")
    knobs = (f", N_D {plan.N_D}" if plan.policy == "rra" else "") + (
        f", streams {plan.microbatches}" if plan.policy in PIPELINE_POLICIES else "")
    print(f"exegpt serve: plan {plan.policy}, B_E {plan.B_E}{knobs}, groups "
          + ", ".join(f"{g.role} tp{g.tp_size} layers {list(g.layer_range)}"
                      + (f" encoder layers {list(g.encoder_layer_range)}"  # T5
                         if g.encoder_layer_range and g.encoder_layer_range[1] else "")
                      for g in plan.worker_groups), flush=True)
    return plan


def auto_plan(args: argparse.Namespace, model_config: dict[str, Any]) -> Any:
    """Profile (cached per model/device/dtype/torch/threads) -> plan, like `exegpt up`."""
    try:
        from common.profiling import measure_profile  # noqa: F401  (the measured profiler)
    except ImportError as exc:
        raise ValueError(f"serving without --plan needs the measured profiler "
                         f"(common.profiling.measure_profile), which failed to import: {exc}; "
                         "make a plan with `exegpt plan` and pass --plan") from exc
    from common.models.config import ModelConfig
    from coordinator.commands._up_profile import ProfileKey, load_or_measure, torch_version
    from coordinator.planner.planning import make_plan
    from coordinator.planner.workload import parse_workload

    cfg = ModelConfig.from_dict(model_config)
    key = ProfileKey(label=Path(args.model).stem or "model", model=cfg, device="cpu",
                     dtype=args.dtype, torch_version=torch_version(), num_threads=1,
                     tp_sizes=(1,))
    profile, path, _ = load_or_measure(key, say=lambda m: print(f"exegpt serve: {m}",
                                                                flush=True))
    if args.profile is None:
        args.profile = str(path)  # what --adapt re-plans with
    return make_plan(parse_workload(args.workload), profile, args.workers or default_workers(),
                     args.latency_bound, policy=args.policy)


def model_fields(model: str) -> dict[str, Any]:
    """LaunchSpec fields of a real model: the path the workers load, its ModelConfig for the
    (torch-free) coordinator, and where its tokenizer is (None: token ids only)."""
    from common.models.registry import load_model_spec

    spec = load_model_spec(model)
    path = Path(model)
    tokenizer = None
    if model.endswith(".gguf") or (path / "tokenizer.json").is_file():
        tokenizer = str(path.resolve())
    return {"model": str(path.resolve()) if path.exists() else model,
            "model_config": spec.config.to_dict(), "tokenizer": tokenizer}


def supervise(mesh: Any, signals: Any) -> int:
    """Until a signal or the coordinator's exit: report worker exits and losses."""
    from common.procs import wait_any

    reported: set[str] = set()
    status_open = True
    while True:
        fds = [signals.read_fd] + ([mesh.status.read_fd] if status_open else [])
        alive = [c for c in mesh.children if c.name not in reported]
        exited, ready = wait_any(alive, fds, None)
        if signals.read_fd in ready:
            signals.drain()
            if signals.received:
                print("exegpt serve: stopping (draining in-flight requests)", flush=True)
                return 0
        if status_open and mesh.status.read_fd in ready:
            for event in mesh.status.read_events():
                if event.get("event") == "closed":
                    status_open = False
                elif event.get("event") == "lost":
                    print(f"exegpt serve: worker {event.get('worker')} lost: "
                          f"{event.get('why')}", file=sys.stderr, flush=True)
        for child in exited:
            if child is mesh.coordinator:
                print(f"exegpt serve: {child.describe_exit()}", file=sys.stderr)
                return 1
            if child.name not in reported:
                reported.add(child.name)
                print(f"exegpt serve: {child.describe_exit()}", file=sys.stderr, flush=True)
        if len(reported) == len(mesh.workers):
            print("exegpt serve: every worker has exited", file=sys.stderr)
            return 1
