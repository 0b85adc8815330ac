"""`exegpt plan --workload observed --connect EP`: the traffic a running coordinator sees, beside
the law its plan assumes (and, with --profile/--workers/--latency-bound, a plan for it).

The numbers come from the coordinator's ``adapt`` stats (coordinator/adapt.py, drift.py): a
window of recent arrivals, outputs of in-flight requests counted as censored lengths.
"""

from __future__ import annotations

from typing import Any


def fetch_adapt(endpoint: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """The coordinator's ``adapt`` stats; ValueError when it does not track its workload."""
    from common.client import Client

    with Client(endpoint, default_timeout_s=timeout_s) as client:
        stats = client.stats(timeout_s=timeout_s).stats
    if "adapt" not in stats:
        raise ValueError(f"the coordinator at {endpoint} does not track its workload; start it "
                         "with --adapt --plan PLAN --profile PROFILE (exegpt serve --adapt)")
    return stats["adapt"]


def _shift(new: float, old: float) -> str:
    return f"({(new - old) / old:+.0%})" if old else ""


def render(adapt: dict[str, Any], endpoint: str) -> str:
    det = adapt["detector"]
    planned, obs = det["planned"], det.get("observed")
    lines = [f"observed workload at {endpoint}: window {det['window']} of {det['arrivals']} "
             f"arrivals; detector {det['state']}"]
    if obs is None:
        return "\n".join(lines + ["  (too few requests yet for a verdict)"])
    lines.append(f"  {'':<16}{'planned':>14}  {'observed':>12}  "
                 f"({obs['output']['finished']} finished, {obs['output']['in_flight']} "
                 "in flight = censored)")
    for side in ("input", "output"):
        p, o = planned[side], obs[side]
        for stat in ("mean", "p50", "p99"):
            lines.append(f"  {side + ' ' + stat:<16}{p[stat]:>14.1f}  {o[stat]:>12.1f}  "
                         f"{_shift(o[stat], p[stat])}")
    lines.append(f"  tests           input KS D={obs['ks_input']:.3f} p={obs['p_input']:.2g}; "
                 f"output log-rank z={obs['z_output']:+.2f} p={obs['p_output']:.2g}")
    if det.get("reasons"):
        lines.append(f"  last drift      {'; '.join(det['reasons'])}")
    knobs = adapt["knobs"]
    lines.append(f"  knobs now       {knobs['policy']} B_E={knobs['B_E']}"
                 + (f" N_D={knobs['N_D']}" if knobs.get("N_D") else "")
                 + f"; {len(adapt['switches'])} switch(es)")
    for s in adapt["switches"][-3:]:
        lines.append(f"    B_E {s['old']['B_E']} -> {s['new']['B_E']}: detect "
                     f"{s['detect_s']:.2f} s, re-plan {s['replan_s']:.2f} s ({s['reason']})")
    return "\n".join(lines)


def run_observed(args: Any) -> int:
    """Print the comparison; plan for the observed law when a profile and size are given."""
    import sys

    from coordinator.commands.plan import planner_errors

    if not args.connect:
        print("exegpt plan: --workload observed needs --connect ENDPOINT (a coordinator "
              "started with --adapt)", file=sys.stderr)
        return 2
    try:
        adapt = fetch_adapt(args.connect)
    except ValueError as exc:
        print(f"exegpt plan: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - the SDK's errors: no answer, refused
        print(f"exegpt plan: no answer from {args.connect}: {exc}", file=sys.stderr)
        return 1
    print(render(adapt, args.connect))
    workers = args.workers if args.workers is not None else args.gpus
    if args.profile is None or workers is None or args.latency_bound is None:
        return 0
    spec = adapt.get("observed_spec")
    if not spec:
        print("exegpt plan: too few requests observed to plan for", file=sys.stderr)
        return 1
    return planner_errors(lambda: _plan_observed(args, spec, workers))


def _plan_observed(args: Any, spec: str, workers: int) -> int:
    from coordinator.commands.plan import plan_from_args
    from coordinator.commands.plan import render as render_plan
    from coordinator.planner.analytic import parse_profile_arg
    from coordinator.planner.workload import parse_workload

    plan = plan_from_args(args, parse_workload(spec), parse_profile_arg(args.profile, args.dtype),
                          workers)
    print("\nplan for the observed workload:\n" + render_plan(plan))
    return 0
