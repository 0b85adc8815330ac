"""A Plan (coordinator.planner.plan) -> the LaunchSpec fields that run it on local processes.

What each plan field becomes at run time:
    worker_groups   one worker per group, ``tp_size`` rank processes in a gloo group
    B_E             the coordinator's encode batch size (``--encode-batch``)
    adjust          the dynamic B_E adjustment bands (coordinator.adjust); the decode band's
                    upper end also caps each decoder's running batch (its capacity), so a
                    flood of requests waits in the coordinator instead of slowing every token
    B_m, N_D        not enforced: this runner's decoders run their whole batch each iteration

This build runs WAA plans whose groups each hold every layer (one encoder group and decoder
groups, or several of each); plans that need pipeline stages (RRA, static, continuous, or a
WAA decode pipeline) are refused with a clear message instead of being run differently.
"""

from __future__ import annotations

import math
from typing import Any

WAA_POLICIES = ("waa-c", "waa-m")  # the plan names of WAA (policy "waa" plans pick one)


def plan_fields(plan: Any, *, null_model: bool, decoder_capacity: int) -> dict[str, Any]:
    """``groups``, ``encode_batch`` and the adjustment bands for a LaunchSpec."""
    from coordinator.launch import WorkerGroup

    if plan.policy not in WAA_POLICIES:
        raise ValueError(f"plan policy {plan.policy!r} is not runnable by this build's serve "
                         f"(it runs {', '.join(WAA_POLICIES)} plans); re-plan with "
                         "--policy waa")
    num_layers = int(plan.model.get("num_layers", 0)) if isinstance(plan.model, dict) else 0
    decoders = sum(g.count // g.tp_size for g in plan.worker_groups if g.role == "decoder")
    band = plan.adjust.get("decode_batch")
    if band and decoders:
        decoder_capacity = min(decoder_capacity, max(1, math.ceil(band[1] / decoders)))
    groups = []
    for g in plan.worker_groups:
        if g.role not in ("encoder", "decoder"):
            raise ValueError(f"a WAA plan has encoder and decoder groups, not {g.role!r}")
        whole = tuple(g.layer_range) == (0, num_layers) or num_layers == 0
        if not whole and not null_model:
            raise ValueError(f"plan group {g.role} holds layers {list(g.layer_range)}: decode "
                             "pipelines across workers are not available in this build; "
                             "plan with fewer workers per role or run --null-model")
        capacity = decoder_capacity if g.role == "decoder" else max(plan.B_E * 2, 1)
        groups.append(WorkerGroup(g.role, g.count // g.tp_size, g.tp_size, capacity))
    bands = {name: ",".join(f"{x:g}" for x in plan.adjust[key])
             for name, key in (("adjust_token_sum", "token_sum"),
                               ("adjust_decode_batch", "decode_batch")) if key in plan.adjust}
    return {"groups": tuple(groups), "encode_batch": int(plan.B_E), **bands}
