"""The adapter's side of a live re-layout: can the served mesh take the new plan's worker
groups, and the ``plan_switch`` once it has (coordinator.relayout does the switch itself).

Supported live (docs/adaptation.md, "Switching live"): pipeline plans (rra, static,
continuous) whose stages are single workers (tp 1): another number of stages (at most the
stage workers connected; the others become spares), other layer ranges, other streams.
Not supported, logged as ``relayout_unsupported`` with the reason, the old layout serving on
with the best knobs it allows: staged WAA meshes (whole-model WAA meshes change their split by
role switches: coordinator.adapt_roles), tp_size changes (a TP group is formed at launch), T5
layer ranges, a switch between the WAA and pipeline families.
"""

from __future__ import annotations

from typing import Any

from coordinator.planner.plan import Plan


def relayout_target(co: Any, old: Plan, new: Plan) -> tuple[Any, int] | str:
    """(StageLayout, number of streams) the served mesh can switch to, or why it cannot."""
    from coordinator.pipeline_driver import StageLayout, _check_cover
    from coordinator.relayout import stage_workers

    driver = getattr(co, "pipeline", None)
    if driver is None or new.policy.startswith("waa") or old.policy.startswith("waa"):
        return ("a staged WAA mesh (layer ranges per worker) is not re-laid out live; "
                "whole-model WAA workers switch roles (coordinator.adapt_roles)")
    if any(g.role != "pipeline" or g.tp_size != 1 for g in new.worker_groups):
        return "the new plan has tensor-parallel stages (tp_size > 1): TP groups form at launch"
    if any(g.tp_size != 1 for g in old.worker_groups):
        return "the served stages are tensor-parallel: TP groups form at launch"
    if driver.switching:
        return "a re-layout is already in progress"
    if co.model.num_encoder_layers:
        return "encoder-decoder (T5) layer ranges are not re-laid out live"
    workers = stage_workers(driver)
    served = [w for w in co.members.registry if w.role == "pipeline"]
    if len(workers) != len(served):
        return "the served stages are tensor-parallel: TP groups form at launch"
    layers = tuple(tuple(g.layer_range) for g in new.worker_groups)
    if len(layers) > len(workers):
        return f"the new plan has {len(layers)} stages, {len(workers)} stage workers are connected"
    try:
        _check_cover(layers, co.model.num_layers, "the new plan's layer ranges")
    except ValueError as exc:
        return str(exc)
    return StageLayout(layers), max(1, new.microbatches or len(layers))


def start(adapter: Any, new: Plan, target: tuple[Any, int], event: dict[str, Any]) -> None:
    """Start the switch; ``plan_switch`` is logged (and the plan adopted) once it is done."""
    from coordinator.relayout import Relayout, RelayoutConfig
    from coordinator.streams import StreamKnobs

    co, driver = adapter.co, adapter.co.pipeline
    layout, streams = target
    adapter.relayouts += 1
    knobs = StreamKnobs(new.policy, new.B_E, new.N_D or 1)

    def done(cost: dict[str, Any]) -> None:
        adapter.relayouting = None
        finish(adapter, new, event, cost)

    cfg = RelayoutConfig(drain_timeout_s=adapter.cfg.drift.drain_timeout_s)
    driver.switch = Relayout(driver, layout, streams, knobs, adapter.relayouts, done, cfg)
    adapter.relayouting = {"plan": new, "event": event}
    co.log.info("relayout_start", epoch=adapter.relayouts, reason=event["reason"],
                old_stages=[list(r) for r in driver.layout.layers],
                new_stages=[list(r) for r in layout.layers], streams=streams)
    driver.schedule()  # the drain starts now (an already idle pipeline re-assigns at once)


def finish(adapter: Any, new: Plan, event: dict[str, Any], cost: dict[str, Any]) -> None:
    """The switch ended: adopt the plan and log ``plan_switch`` with its cost, or log why not."""
    import time

    from coordinator.adapt_knobs import apply_knobs

    co = adapter.co
    relayout = {k: v for k, v in cost.items() if k != "ok"}
    if not cost.get("ok"):
        co.log.error("relayout_failed", reason=event["reason"], **relayout)
        return
    old = adapter.plan
    apply_knobs(co, new)  # WAA sizer and every (new) stream's knobs
    adapter.plan = new
    now = time.time()  # the new layout serves from now
    event = {**event, "relayout": relayout, "pause_s": relayout["pause_s"], "t": now,
             "switch_s": round(now - event["t_fire"], 3)}
    event.pop("t_fire", None)
    adapter.switches.append(event)
    co.log.info("plan_switch", **event, plan=new.to_dict(), old_layout=_groups(old),
                new_layout=_groups(new))
    metrics = getattr(co, "metrics", None)
    if metrics is not None:
        metrics.set_plan(new.to_dict(), event)


def _groups(plan: Plan) -> list[dict[str, Any]]:
    return [{"role": g.role, "tp_size": g.tp_size, "layer_range": list(g.layer_range)}
            for g in plan.worker_groups]
