"""`exegpt up`: the embedded default, from nothing to a server that answers, in one command.

    exegpt up              SmolLM2-135M-Instruct (bf16): profile (cached) -> plan -> serve
    exegpt up --demo       ... then send real prompts through the SDK, print the answers, the
                           measured throughput and the p99-length latency vs the bound, and exit

Steps: (1) the profile of this model on this machine comes from the cache
(``$XDG_CACHE_HOME/exegpt``, keyed by model, device, dtype, torch version and threads) or is
measured once with `exegpt profile`'s machinery; (2) the planner picks the highest-throughput
schedule whose p99-length latency stays under the bound for the workload; (3) `exegpt serve`
runs that plan on local worker processes (one torch thread each) behind a tcp endpoint.
Exit status: 0 served (or demo answered), 1 the mesh failed, 2 bad input or no feasible plan.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

# Defaults sized for a 2-core CPU (docs/deploy.md explains them): short chat turns, two worker
# processes of one thread each, and a bound the planner can meet there with room to batch.
DEFAULT_WORKLOAD = "in=normal:64,32,256;out=normal:48,24,128;name=chat"
DEFAULT_LATENCY_BOUND_S = 15.0
DEFAULT_PORT = 5555
DEFAULT_DTYPE = "bfloat16"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("up", help="profile (cached), plan and serve the default model",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="a .gguf file, HF model directory or preset (default: the embedded "
                        "SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=("bfloat16", "float32"))
    p.add_argument("--workload", default=DEFAULT_WORKLOAD,
                   help=f"what to plan for (`exegpt plan --help`; default {DEFAULT_WORKLOAD!r})")
    p.add_argument("--latency-bound", type=float, default=None,
                   help=f"seconds a p99-length request may take (default "
                        f"{DEFAULT_LATENCY_BOUND_S:g}; when no plan this build runs meets the "
                        "default, the tightest reachable latency plus 25%%)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="worker processes (default: 2, or 1 on a 1-core machine)")
    p.add_argument("--policy", default="auto",
                   choices=("auto", "rra", "waa", "waa-c", "waa-m", "static", "continuous"))
    p.add_argument("--profile", type=Path, default=None,
                   help="plan from this profile JSON instead of the cached/measured one")
    p.add_argument("--quick-profile", action="store_true",
                   help="measure a coarse grid (under a minute; a rougher plan)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--host", default="127.0.0.1", help="interface the client endpoint binds")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help="client port (default %(default)d; 0 picks a free one)")
    p.add_argument("--null-model", action="store_true",
                   help="run the plan's mesh with the null model (no math; for trying the mesh)")
    p.add_argument("--adapt", action="store_true",
                   help="re-plan and switch the plan's knobs live when the served lengths drift "
                        "from --workload (`exegpt serve --adapt`, docs/adaptation.md)")
    p.add_argument("--demo", action="store_true",
                   help="send a batch of real prompts, print answers and numbers, then exit")
    p.add_argument("--demo-requests", type=int, default=None,
                   help="requests in the demo batch (default: the sequences the plan keeps in "
                        "flight, B_E x microbatches, within 8..64)")
    p.add_argument("--demo-probes", type=int, default=4,
                   help="of which p99-length probes (ignore EOS, run to the p99 output length)")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"), help="parent of run dirs")
    p.add_argument("--startup-timeout", type=float, default=300.0,
                   help="seconds the mesh may take to load and report READY")
    p.set_defaults(func=run)


def say(text: str) -> None:
    print(f"exegpt up: {text}", flush=True)


def run(args: argparse.Namespace) -> int:
    from coordinator.planner.scheduler import InfeasibleBound

    try:
        _check_args(args)
        model = resolve_model(args.model)
        profile = _profile(args, model)
        plan = _plan(args, profile, args.policy)
        plan_path = _save_plan(plan, args.runs_dir)
        argv, endpoint = _serve_argv(args, plan, plan_path, model)
    except InfeasibleBound as exc:
        print(f"exegpt up: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:
        print(f"exegpt up: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError, OSError) as exc:  # e.g. a profiling process died
        print(f"exegpt up: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    from coordinator.commands.plan import render

    print(render(plan), flush=True)
    say(f"plan saved to {plan_path}")
    if not args.demo:
        say(f"serving on {endpoint}: connect with Client({endpoint!r}) "
            f"(common/client.py) or `exegpt stats --endpoint {endpoint}`; Ctrl-C stops")
        sys.stdout.flush()
        os.execv(argv[0], argv)  # serve owns signals and supervision from here on
    from coordinator.commands._up_demo import run_demo

    return run_demo(args, plan, argv, endpoint, model.tokenizer(), model.cfg.vocab_size)


def _check_args(args: argparse.Namespace) -> None:
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.latency_bound is not None and not args.latency_bound > 0:
        raise ValueError(f"--latency-bound must be > 0 seconds, got {args.latency_bound}")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.demo_requests is not None and not 0 <= args.demo_probes <= args.demo_requests:
        raise ValueError("need 0 <= --demo-probes <= --demo-requests")
    if args.demo_probes < 0:
        raise ValueError(f"--demo-probes must be >= 0, got {args.demo_probes}")


class Model:
    """What `up` needs to know about the model: its shape, a label, and where its files are."""

    def __init__(self, cfg: Any, label: str, path: str | None) -> None:
        self.cfg, self.label, self.path = cfg, label, path

    def tokenizer(self) -> Any:
        if self.path is None:
            return None
        if self.path.endswith(".gguf"):
            from common.models.gguf_meta import open_gguf
            from common.models.tokenizer import tokenizer_from_gguf

            return tokenizer_from_gguf(open_gguf(self.path))
        from common.models.tokenizer import load_hf_tokenizer

        return load_hf_tokenizer(self.path)

    def preset_shape(self) -> str | None:
        """The preset with this model's shape (the null model sizes its KV by a preset)."""
        from common.models.config import ModelConfig

        mine = {k: v for k, v in self.cfg.to_dict().items() if k != "name"}
        for name in ModelConfig.preset_names():
            other = ModelConfig.preset(name).to_dict()
            if all(other.get(k) == mine.get(k) for k in ("family", "vocab_size", "hidden_size",
                   "num_layers", "num_encoder_layers", "num_heads", "num_kv_heads", "head_dim",
                   "ffn_size")):
                return name
        return None


def resolve_model(text: str | None) -> Model:
    from common.models.config import ModelConfig

    if text is None:
        from common.models.gguf_loader import default_gguf_path

        text = str(default_gguf_path())
    if text in ModelConfig.preset_names():
        return Model(ModelConfig.preset(text), text, None)
    from common.profiling.measure import resolve_model as resolve

    cfg = resolve(text)
    path = Path(text)
    return Model(cfg, path.stem if path.suffix == ".gguf" else path.name, str(path.resolve()))


def _profile(args: argparse.Namespace, model: Model) -> Any:
    from coordinator.commands._up_profile import (
        ProfileKey,
        load_or_measure,
        torch_version,
        valid_tp_sizes,
    )
    from coordinator.planner.profile import Profile

    if args.profile is not None:
        args.profile_path = Path(args.profile).resolve()  # --adapt re-plans from it
        return Profile.load(args.profile, model.cfg, args.dtype)
    key = ProfileKey(model.label, model.cfg, "cpu", args.dtype, torch_version(), args.threads,
                     valid_tp_sizes(model.cfg, args.workers))
    profile, path, _ = load_or_measure(key, say=say, quick=args.quick_profile)
    args.profile_path = path
    say(f"profile: {path}")
    return profile


def runnable_problem(plan: Any, null_model: bool) -> str | None:
    """Why `serve --plan` would refuse ``plan`` (None: it runs it)."""
    from coordinator.plan_launch import plan_fields

    try:
        plan_fields(plan, null_model=null_model, decoder_capacity=256)
    except ValueError as exc:
        return str(exc)
    return None


def _plan(args: argparse.Namespace, profile: Any, policy: str) -> Any:
    from coordinator.planner.workload import parse_workload

    bound = DEFAULT_LATENCY_BOUND_S if args.latency_bound is None else args.latency_bound
    say(f"planning for {args.workload!r} under a {bound:g} s bound on {args.workers} worker(s)")
    workload = parse_workload(args.workload)
    plan = _plan_or_relax(args, workload, profile, bound, policy)
    # serve runs every plan the planner makes (WAA on encoder/decoder workers or, when groups
    # hold layer ranges, two pipelines of stages, T5 too; the others on stages): a problem
    # here is a planner/runner mismatch, said before anything starts
    problem = runnable_problem(plan, args.null_model)
    if problem is not None:
        raise ValueError(f"the planner's {plan.policy} plan is not runnable by `exegpt serve`: "
                         f"{problem}")
    return plan


def _plan_or_relax(args: argparse.Namespace, workload: Any, profile: Any, bound: float,
                   policy: str) -> Any:
    """The plan under ``bound``; if the user left the bound at its default and nothing meets
    it, the tightest reachable latency plus 25% (said out loud: the user did not choose it)."""
    from coordinator.planner.candidate import WorkloadStats
    from coordinator.planner.costs import Costs
    from coordinator.planner.planning import make_plan, policies_for
    from coordinator.planner.scheduler import InfeasibleBound, tightest_latency

    try:
        return make_plan(workload, profile, args.workers, bound, policy=policy)
    except InfeasibleBound:
        if args.latency_bound is not None:
            raise
        tight, cand = tightest_latency(WorkloadStats(workload), Costs(profile), args.workers,
                                       policies=policies_for(policy), sla="b")
        if cand is None:
            raise
    relaxed = float(f"{tight * 1.25:.2g}")
    say(f"no {policy} plan meets the default {bound:g} s bound here (the tightest p99-length "
        f"latency is {tight:.1f} s): planning for {relaxed:g} s; pass --latency-bound to choose")
    return make_plan(workload, profile, args.workers, relaxed, policy=policy)


def _save_plan(plan: Any, runs_dir: Path) -> Path:
    runs_dir.mkdir(parents=True, exist_ok=True)
    path = runs_dir / "up-plan.json"
    path.write_text(plan.to_json())
    return path.resolve()


def _serve_argv(args: argparse.Namespace, plan: Any, plan_path: Path,
                model: Model) -> tuple[list[str], str]:
    from coordinator.commands._mesh_proc import free_tcp_endpoint, serve_argv, serve_flags

    endpoint = (free_tcp_endpoint(args.host) if args.port == 0
                else f"tcp://{args.host}:{args.port}")
    flags = serve_flags()
    argv = serve_argv(plan, plan_path, model_path=model.path, endpoint=endpoint,
                      runs_dir=args.runs_dir, null_model=args.null_model, dtype=args.dtype,
                      flags=flags)
    if args.null_model and "--model-shape" in flags:
        shape = model.preset_shape()
        if shape is None:
            raise ValueError(f"the null model needs a preset shaped like {model.label}")
        argv += ["--model-shape", shape]
    if "--startup-timeout" in flags:
        argv += ["--startup-timeout", str(args.startup_timeout)]
    if getattr(args, "adapt", False):
        argv += ["--adapt", "--profile", str(args.profile_path)]
    return argv, endpoint
