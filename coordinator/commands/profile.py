"""`exegpt profile`: write the cost table the planner plans from.

    exegpt profile --analytic a40 --model opt-13b --out a40-opt13b.json   (roofline, instant)
    exegpt profile --model smollm2-135m --tp 1,2 --dtype bfloat16 --out cpu.json  (measured)

The measured path runs the real engine code through ``common.profiling.measure_profile(model,
tp_sizes, dtype, device, ...)``, which returns ``{"meta": ..., "rows": [...]}`` in the format of
docs/planner.md ("Profile format"); it is validated by the planner's Profile before saving.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("profile", help="measure (or model) per-layer costs for the planner",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model preset name (or a model path)")
    p.add_argument("--analytic", choices=["a40", "a100", "h100"],
                   help="roofline profile of this GPU instead of measuring")
    p.add_argument("--tp", default=None, help="comma-separated TP degrees (default 1,2,4,8 "
                                              "analytic; 1 measured)")
    p.add_argument("--dtype", default=None, help="float16|bfloat16|float32 (default: float16 "
                                                 "analytic, bfloat16 measured)")
    p.add_argument("--device", default="cpu", help="device to measure on")
    p.add_argument("--quick", action="store_true", help="measured: a tiny grid (seconds)")
    p.add_argument("--out", default="profile.json", help="where to write the profile JSON")
    p.set_defaults(func=run)


def _tp_sizes(text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    if text is None:
        return default
    try:
        sizes = tuple(int(t) for t in text.split(","))
    except ValueError as exc:
        raise ValueError(f"--tp must be comma-separated integers, got {text!r}") from exc
    if not sizes or min(sizes) < 1:
        raise ValueError("--tp sizes must be >= 1")
    return sizes


def _check_writable(out: str) -> None:
    """Fail before a measurement that takes minutes, not after it."""
    parent = Path(out).resolve().parent
    if not parent.is_dir():
        raise ValueError(f"--out {out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (Path(out).exists() and not os.access(out, os.W_OK)):
        raise ValueError(f"--out {out}: not writable")


def run(args: argparse.Namespace) -> int:
    try:
        _check_writable(args.out)
        profile = _analytic(args) if args.analytic else _measured(args)
    except (ValueError, ImportError) as exc:
        print(f"exegpt profile: {exc}", file=sys.stderr)
        return 1
    profile.save(args.out)
    tps = ",".join(str(t) for t in profile.tp_sizes)
    print(f"wrote {args.out}: {len(profile.rows)} rows, tp {tps}, {profile.meta['source']} on "
          f"{profile.meta['device']} ({profile.meta['dtype']})")
    return 0


def _analytic(args: argparse.Namespace):  # noqa: ANN202
    from common.models.config import ModelConfig
    from coordinator.planner.analytic import analytic_profile

    return analytic_profile(args.analytic, ModelConfig.preset(args.model),
                            args.dtype or "float16", _tp_sizes(args.tp, (1, 2, 4, 8)))


def _measured(args: argparse.Namespace):  # noqa: ANN202
    from coordinator.planner.profile import Profile

    try:
        from common.profiling import measure_profile
    except ImportError as exc:
        raise ImportError(
            "measuring on this device needs common.profiling.measure_profile, which is not "
            f"available in this build ({exc}); use --analytic a40|a100|h100 for a roofline "
            "profile") from exc
    data = measure_profile(args.model, _tp_sizes(args.tp, (1,)), args.dtype or "bfloat16",
                           args.device, quick=args.quick)
    if not isinstance(data, dict) or "meta" not in data or "rows" not in data:
        raise ValueError("measure_profile must return {'meta': ..., 'rows': [...]}")
    return Profile(meta=data["meta"], rows=data["rows"])
