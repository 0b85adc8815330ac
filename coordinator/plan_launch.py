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
                    before (with --null-model a staged plan runs on whole-model null workers).
                    T5: the encoder groups' ``encoder_layer_range`` split the encoder stack and
                    become the encoder stages' layer ranges, the decoder groups' ``layer_range``
                    split the decoder stack; the last encoder stage hands every decoder stage
                    its layers' cross K/V (coordinator/waa_layout.py)

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
        ranges = staged_ranges(plan, num_layers, num_enc)
        groups = tuple(WorkerGroup(g.role, 1, g.tp_size, decoder_capacity, layer_range=rng)
                       for g, rng in ranges)
        return {"groups": groups, "encode_batch": int(plan.B_E),
                "streams": int(plan.B_m or plan.microbatches or 1), **bands}
    groups = [WorkerGroup(g.role, g.count // g.tp_size, g.tp_size,
                          decoder_capacity if g.role == "decoder" else max(plan.B_E * 2, 1))
              for g in plan.worker_groups]
    return {"groups": tuple(groups), "encode_batch": int(plan.B_E), **bands}


def staged_ranges(plan: Any, num_layers: int, num_enc: int) -> list[tuple[Any, tuple[int, int]]]:
    """Each staged group (encoders first) with the layers its stage holds of its side's stack
    (T5's encoder side: of the encoder stack); ValueError with what to do when a role's
    groups do not tile their stack in order."""
    out = []
    for role in ("encoder", "decoder"):
        groups = [g for g in plan.worker_groups if g.role == role]
        ranges = [_side_range(g, num_enc) for g in groups]
        total = num_enc if num_enc and role == "encoder" else num_layers
        lo = 0
        for rng in ranges:
            if rng[0] != lo or rng[1] <= lo:
                raise ValueError(f"the WAA plan's {role} groups hold layers "
                                 f"{[list(r) for r in ranges]}: a staged role needs "
                                 "contiguous ranges covering every layer, in order")
            lo = rng[1]
        if lo != total:
            raise ValueError(f"the WAA plan's {role} groups cover layers 0..{lo} of {total}")
        out += list(zip(groups, ranges, strict=True))
    return out


def _side_range(g: Any, num_enc: int) -> tuple[int, int]:
    """A staged group's layers of its side's stack. T5 encoder groups hold encoder layers
    only and decoder groups decoder layers only (the last encoder stage computes the decoder
    layers' cross K/V from its own weights; it holds no other decoder layer)."""
    dec = (int(g.layer_range[0]), int(g.layer_range[1]))
    if not num_enc:
        return dec
    enc = tuple(int(x) for x in g.encoder_layer_range) if g.encoder_layer_range else (0, 0)
    if g.role == "encoder" and dec[0] == dec[1]:
        return (enc[0], enc[1])
    if g.role == "decoder" and enc[0] == enc[1]:
        return dec
    raise ValueError(f"a staged T5 WAA plan's {g.role} group holds encoder layers "
                     f"{list(enc)} and decoder layers {list(dec)}: an encoder stage holds "
                     "encoder layers only, a decoder stage decoder layers only")
