"""A Plan (coordinator.planner.plan) -> the LaunchSpec fields that run it on local processes.

What each plan field becomes at run time:
    policy          waa-c / waa-m: encoder and decoder workers (the coordinator's ``waa``);
                    rra / static / continuous: a pipeline of stage workers whose passes the
                    coordinator schedules by streams (``--policy``; coordinator/streams.py)
    worker_groups   one worker per group, ``tp_size`` rank processes in a gloo group; pipeline
                    groups in plan order are stages 0..P-1 holding their ``layer_range`` (T5:
                    also ``encoder_layer_range``)
    B_E             WAA: the coordinator's encode batch size (``--encode-batch``); pipeline
                    plans: each stream's batch (static: the batch; continuous: its slots;
                    rra: the requests one encode pass takes)
    N_D             rra: decode passes per encode pass (``--n-d``)
    microbatches    pipeline plans: the streams (request groups in flight, ``--streams``)
    adjust          WAA: the dynamic B_E adjustment bands (coordinator.adjust); the decode
                    band's upper end also caps each decoder's running batch (its capacity), so
                    a flood of requests waits in the coordinator instead of slowing every
                    token. Pipeline plans run their plan's B_E unadjusted.
    B_m             staged WAA: the decode micro-batches in flight (``--streams``); WAA
                    groups holding the whole model run their whole batch each iteration
    layer_range     WAA: when the groups hold layer ranges, each role is a pipeline of stage
                    workers (coordinator/waa_pipeline.py): encoder stages hand each stage's KV
                    to the decoder stages holding those layers, decoder stages run B_m
                    micro-batches (a stage may be a TP group); whole-model groups are replicas as
                    before. Staged WAA for T5 is refused for a real model with a clear message
                    (with --null-model a staged plan runs on whole-model null workers).

T5 runs over several pipeline stages, each holding its ``encoder_layer_range`` and
``layer_range`` (encodes take two laps, ``common.backend_stage_engine``).
"""

from __future__ import annotations

import math
from typing import Any

WAA_POLICIES = ("waa-c", "waa-m")  # the plan names of WAA (policy "waa" plans pick one)
PIPELINE_POLICIES = ("rra", "static", "continuous")


def plan_fields(plan: Any, *, null_model: bool, decoder_capacity: int) -> dict[str, Any]:
    """``groups``, ``encode_batch`` and the policy's knobs for a LaunchSpec."""
    if plan.policy in PIPELINE_POLICIES:
        return pipeline_fields(plan, null_model=null_model)
    if plan.policy not in WAA_POLICIES:
        raise ValueError(f"plan policy {plan.policy!r} is not runnable by this build's serve "
                         f"(it runs {', '.join(WAA_POLICIES + PIPELINE_POLICIES)} plans)")
    return waa_fields(plan, null_model=null_model, decoder_capacity=decoder_capacity)


def pipeline_fields(plan: Any, *, null_model: bool) -> dict[str, Any]:
    """One ``pipeline`` group per stage, the policy, B_E, N_D and the streams."""
    from coordinator.launch import WorkerGroup

    stages = [g for g in plan.worker_groups if g.role == "pipeline"]
    if not stages or len(stages) != len(plan.worker_groups):
        raise ValueError(f"a {plan.policy} plan has pipeline groups only, got "
                         f"{[g.role for g in plan.worker_groups]}")
    encoder_layers = int(plan.model.get("num_encoder_layers", 0) or 0)
    groups = tuple(WorkerGroup("pipeline", 1, g.tp_size, layer_range=tuple(g.layer_range),
                               encoder_layer_range=(tuple(g.encoder_layer_range)
                                                    if encoder_layers and g.encoder_layer_range
                                                    else None))
                   for g in stages)
    return {"groups": groups, "encode_batch": int(plan.B_E), "policy": plan.policy,
            "n_d": int(plan.N_D or 1), "streams": int(plan.microbatches or len(stages))}


def waa_fields(plan: Any, *, null_model: bool, decoder_capacity: int) -> dict[str, Any]:
    """Encoder and decoder groups, B_E and its adjustment bands; a staged plan's groups are
    one stage each, with B_m micro-batches."""
    from coordinator.launch import WorkerGroup

    num_layers = int(plan.model.get("num_layers", 0)) if isinstance(plan.model, dict) else 0
    for g in plan.worker_groups:
        if g.role not in ("encoder", "decoder"):
            raise ValueError(f"a WAA plan has encoder and decoder groups, not {g.role!r}")
    num_enc = int(plan.model.get("num_encoder_layers", 0) or 0) if num_layers else 0

    def whole(g: Any) -> bool:
        """The group holds its role's whole model (a T5 encoder: the whole encoder, no
        decoder layers), i.e. it is not a stage."""
        if num_enc and g.role == "encoder":
            return (tuple(g.layer_range) == (0, 0)
                    and tuple(g.encoder_layer_range or (0, num_enc)) == (0, num_enc))
        return tuple(g.layer_range) == (0, num_layers)

    is_staged = num_layers > 0 and not null_model and not all(map(whole, plan.worker_groups))
    decoders = (1 if is_staged else
                sum(g.count // g.tp_size for g in plan.worker_groups if g.role == "decoder"))
    band = plan.adjust.get("decode_batch")
    if band and decoders:
        decoder_capacity = min(decoder_capacity, max(1, math.ceil(band[1] / decoders)))
    bands = {name: ",".join(f"{x:g}" for x in plan.adjust[key])
             for name, key in (("adjust_token_sum", "token_sum"),
                               ("adjust_decode_batch", "decode_batch")) if key in plan.adjust}
    if is_staged:
        check_staged(plan, num_layers)
        groups = tuple(WorkerGroup(g.role, 1, g.tp_size, decoder_capacity,
                                   layer_range=(int(g.layer_range[0]), int(g.layer_range[1])))
                       for role in ("encoder", "decoder")
                       for g in plan.worker_groups if g.role == role)
        return {"groups": groups, "encode_batch": int(plan.B_E),
                "streams": int(plan.B_m or plan.microbatches or 1), **bands}
    groups = [WorkerGroup(g.role, g.count // g.tp_size, g.tp_size,
                          decoder_capacity if g.role == "decoder" else max(plan.B_E * 2, 1))
              for g in plan.worker_groups]
    return {"groups": tuple(groups), "encode_batch": int(plan.B_E), **bands}


def check_staged(plan: Any, num_layers: int) -> None:
    """A staged WAA plan runs when each role's groups tile the layers in order and the model
    is decoder-only (ValueError with what to do otherwise)."""
    if int(plan.model.get("num_encoder_layers", 0) or 0):
        raise ValueError(f"the WAA plan splits {plan.model.get('name')} (T5) into layer "
                         "ranges; staged WAA runs decoder-only models: re-plan with fewer "
                         "workers per role, or try the plan with --null-model")
    for role in ("encoder", "decoder"):
        groups = [g for g in plan.worker_groups if g.role == role]
        lo = 0
        for g in groups:
            if int(g.layer_range[0]) != lo or int(g.layer_range[1]) <= lo:
                raise ValueError(f"the WAA plan's {role} groups hold layers "
                                 f"{[list(x.layer_range) for x in groups]}: a staged role "
                                 "needs contiguous ranges covering every layer, in order")
            lo = int(g.layer_range[1])
        if lo != num_layers:
            raise ValueError(f"the WAA plan's {role} groups cover layers 0..{lo} of "
                             f"{num_layers}")
