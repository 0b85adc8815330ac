"""Putting a plan's knobs live, and the figures a ``plan_switch`` event reports about plans."""

from __future__ import annotations

from typing import Any

from coordinator.planner.plan import Plan


def apply_knobs(co: Any, plan: Plan, durable: bool = True) -> None:
    """Install a plan's knobs in the running coordinator (on its loop thread, so between two
    batches): WAA's BatchSizer; pipeline streams' B and N_D (RRA: from the next cycle).
    ``durable``: the plan is the served one from now, so it is written to the layout state
    (whatever switch adopted it: re-layout, role switch, knobs only), and a restarted
    coordinator serves it rather than the launch plan's knobs and roles."""
    from coordinator.adjust import Band, BatchSizer

    ts, db = plan.adjust.get("token_sum"), plan.adjust.get("decode_batch")
    co.sizer = BatchSizer(plan.B_E, cap=co.sizer.cap, token_sum=Band(*ts) if ts else None,
                          decode_batch=Band(*db) if db else None)
    pipeline = getattr(co, "pipeline", None)
    if pipeline is not None:
        from coordinator.streams import StreamKnobs

        for stream in pipeline.streams:
            stream.knobs = StreamKnobs(stream.knobs.policy, plan.B_E, plan.N_D or 1)
    if durable:
        from coordinator import layout_state

        layout_state.save(co, plan)


def pred(plan: Plan) -> dict[str, Any]:
    p = plan.predicted
    return {"throughput_seq_s": p.get("throughput_seq_s"), "latency_s": p.get(
        "latency_p99len_s" if plan.sla == "b" else "latency_p99_s")}


def gain(best: Plan, fit: Plan | None) -> float | None:
    if fit is None or not fit.predicted.get("throughput_seq_s"):
        return None
    return best.predicted["throughput_seq_s"] / fit.predicted["throughput_seq_s"] - 1.0
