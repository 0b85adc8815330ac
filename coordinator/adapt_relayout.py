"""The adapter's side of a live re-layout: can the served mesh take the new plan's worker
groups, and the ``plan_switch`` once it has (coordinator.relayout does the switch itself).

Supported live (docs/adaptation.md, "Switching live"): pipeline plans (rra, static,
continuous): another number of stages (at most the stage workers connected; the others become
spares), other layer ranges, other streams, other tp_size per stage (the stage workers are
re-grouped into new TP groups: coordinator.relayout_tp); staged
WAA plans: another encoder/decoder stage split, other ranges, other B_m, other tp_size per
stage (re-grouped: relayout_tp.WaaTpRelayout), on the same number of stage workers
(whole-model WAA meshes change their split by role switches:
coordinator.adapt_roles). T5 (encoder-decoder): pipeline stages get new ranges of both
stacks (each stage a non-empty part of each, in order), staged WAA meshes a new split of the
encoder stack over the encoder stages and of the decoder stack over the decoder stages (the
last encoder stage hands on cross K/V: ``WaaLayout.cross``). Not supported, logged as
``relayout_unsupported`` with the reason, the old layout serving on with the best knobs it
allows: more TP ranks than stage workers connected, a switch between the WAA and pipeline
families.
"""

from __future__ import annotations

from typing import Any

from coordinator import layout_state
from coordinator.planner.plan import Plan


def relayout_target(co: Any, old: Plan, new: Plan) -> tuple[Any, int] | str:
    """(StageLayout, number of streams) the served mesh can switch to, or why it cannot."""
    from coordinator.pipeline_driver import StageLayout, _check_cover
    from coordinator.relayout import stage_workers

    driver = getattr(co, "pipeline", None)
    if driver is not None and old.policy.startswith("waa"):
        return waa_target(co, driver, new)
    if driver is None or new.policy.startswith("waa"):
        return ("a switch between the WAA and pipeline families (whole-model WAA workers "
                "switch roles: coordinator.adapt_roles)")
    if any(g.role != "pipeline" for g in new.worker_groups):
        return "the new plan's groups are not pipeline stages"
    if driver.switching:
        return "a re-layout is already in progress"
    workers = stage_workers(driver)
    served = [w for w in co.members.registry if w.role == "pipeline"]
    if len(workers) != len(served) or any(g.tp_size != 1 for g in (*old.worker_groups,
                                                                    *new.worker_groups)):
        return tp_target(co, new, len(served))
    layers = tuple(tuple(g.layer_range) for g in new.worker_groups)
    if len(layers) > len(workers):
        return f"the new plan has {len(layers)} stages, {len(workers)} stage workers are connected"
    try:
        _check_cover(layers, co.model.num_layers, "the new plan's layer ranges")
        enc = t5_encoder_ranges(co.model, new)
    except ValueError as exc:
        return str(exc)
    return StageLayout(layers, enc), max(1, new.microbatches or len(layers))


def t5_encoder_ranges(model: Any, new: Plan) -> tuple[tuple[int, int], ...] | None:
    """A T5 pipeline plan's encoder-stack range per stage (None for a decoder-only model).
    Every T5 stage holds a non-empty part of both stacks, in order (the two-lap encode:
    common.backend_stage_engine), so the encoder ranges must tile the encoder stack too."""
    from coordinator.pipeline_driver import _check_cover

    if not model.num_encoder_layers:
        return None
    missing = [i for i, g in enumerate(new.worker_groups) if g.encoder_layer_range is None]
    if missing:
        raise ValueError(f"the new T5 plan's stages {missing} have no encoder_layer_range")
    enc = tuple((int(g.encoder_layer_range[0]), int(g.encoder_layer_range[1]))
                for g in new.worker_groups)
    _check_cover(enc, model.num_encoder_layers, "the new plan's encoder layer ranges")
    return enc


def tp_target(co: Any, new: Plan, connected: int) -> tuple[Any, int] | str:
    """(TpStageLayout, streams) when either side has TP stages: every worker re-grouped
    (coordinator.relayout_tp), one group of ``tp_size`` ranks per stage."""
    from coordinator.pipeline_driver import _check_cover
    from coordinator.relayout_tp import TpStageLayout, check_heads

    if any(g.count != g.tp_size for g in new.worker_groups):
        return "the new plan's pipeline stages are not one TP group each (count != tp_size)"
    tps = tuple(g.tp_size for g in new.worker_groups)
    if sum(tps) > connected:
        return (f"the new plan needs {sum(tps)} stage workers (tp {list(tps)}), "
                f"{connected} are connected")
    layers = tuple(tuple(g.layer_range) for g in new.worker_groups)
    try:
        _check_cover(layers, co.model.num_layers, "the new plan's layer ranges")
        check_heads(co, tps)  # e.g. SmolLM2's 9 heads: no tp 2
        layout = TpStageLayout(layers, t5_encoder_ranges(co.model, new), tp=tps)
    except ValueError as exc:
        return str(exc)
    return layout, max(1, new.microbatches or len(layers))


def waa_target(co: Any, driver: Any, new: Plan) -> tuple[Any, int] | str:
    """(WaaLayout, B_m) of a staged WAA plan the served staged mesh can switch to, or why not:
    every group one tp-1 stage, the same number of stages as tp-1 stage workers connected."""
    from coordinator.plan_launch import staged_ranges
    from coordinator.relayout import stage_workers
    from coordinator.waa_layout import WaaLayout

    if not new.policy.startswith("waa"):
        return "a switch between the WAA and pipeline families"
    if any(g.count != g.tp_size for g in new.worker_groups):
        return ("the new plan's groups are not one stage each (count != tp_size: "
                "whole-model replicas): not a staged layout of these workers")
    workers = [w for w in co.members.registry if w.role == "pipeline"]  # every TP rank
    if driver.switching:
        return "a re-layout is already in progress"
    if any(not w.kv_endpoint for w in workers):
        return "a stage worker without a KV endpoint cannot become a decoder stage"
    try:
        t5 = co.model.is_encoder_decoder  # T5: the encoder stages split the encoder stack
        ranges = staged_ranges(new, co.model.num_layers, co.model.num_encoder_layers if t5 else 0)
        tps = tuple(g.tp_size for g, _ in ranges)
        if sum(tps) != len(workers):
            return (f"the new plan has {len(ranges)} stages"
                    + (f" of {sum(tps)} ranks (tp {list(tps)})" if sum(tps) != len(ranges)
                       else "") + f", {len(workers)} stage workers are connected (a staged "
                    "WAA re-layout keeps every worker busy)")
        regroup = any(t > 1 for t in tps) or len(stage_workers(driver)) != len(workers)
        if regroup:
            from coordinator.relayout_tp import check_heads

            check_heads(co, tps)
        layout = WaaLayout(tuple(r for g, r in ranges if g.role == "encoder"),
                           tuple(r for g, r in ranges if g.role == "decoder"),
                           tp=tps if regroup else (),  # tp: re-grouped (relayout_tp)
                           cross=t5, start_token=driver.layout.start_token)
    except ValueError as exc:
        return str(exc)
    return layout, max(1, int(new.B_m or new.microbatches or 1))


def start(adapter: Any, new: Plan, target: tuple[Any, int], event: dict[str, Any]) -> None:
    """Start the switch; ``plan_switch`` is logged (and the plan adopted) once it is done."""
    from coordinator.relayout import (
        Relayout,
        RelayoutConfig,
        WaaRelayout,
        encoder_stages,
        layout_stages,
    )
    from coordinator.relayout_tp import TpRelayout, TpStageLayout, WaaTpRelayout
    from coordinator.streams import StreamKnobs

    co, driver = adapter.co, adapter.co.pipeline
    layout, streams = target
    adapter.relayouts += 1
    old_stages = layout_stages(driver.layout)
    old_enc = encoder_stages(driver.layout).get("encoder_stages")

    def done(cost: dict[str, Any]) -> None:
        adapter.relayouting = None
        finish(adapter, new, event, cost)

    cfg = RelayoutConfig(drain_timeout_s=adapter.cfg.drift.drain_timeout_s)
    if new.policy.startswith("waa"):
        waa = WaaTpRelayout if layout.tp else WaaRelayout  # TP stages: re-grouped
        driver.switch = waa(driver, layout, streams, adapter.relayouts, done, cfg)
    else:
        knobs = StreamKnobs(new.policy, new.B_E, new.N_D or 1)
        kind = TpRelayout if isinstance(layout, TpStageLayout) else Relayout
        driver.switch = kind(driver, layout, streams, knobs, adapter.relayouts, done, cfg)
    adapter.relayouting = {"plan": new, "event": event}
    co.log.info("relayout_start", epoch=adapter.relayouts, reason=event["reason"],
                old_stages=old_stages, new_stages=layout_stages(layout), streams=streams,
                tp_sizes=list(getattr(layout, "tp", ())) or None,
                **({"old_encoder_stages": old_enc, "new_encoder_stages":
                    encoder_stages(layout)["encoder_stages"]} if old_enc else {}))
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
    # durable before it is reported: a coordinator restarted from now expects this layout
    layout_state.commit(co, new, adapter.relayouts, int(relayout.get("streams") or 1))
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
