"""Driving T5 through pipeline stages: the extra trip an encoder-decoder model needs.

With ExeGPT's RRA layout (``stage_ranges``: every stage holds E/N encoder and D/N decoder
layers) the encoder output appears on the last stage, but every stage needs it for the
cross-attention K/V of its decoder layers. ``encode`` therefore runs

    trip 1  encoder layers stage 0 -> N-1 (the last stage writes its cross K/V)
    trip 2  the last stage hands the encoder output to stages 0..N-2 (their cross K/V)
    step 0  a decode pass of the start token (pad) through stages 0 -> N-1 = first token

``T5LocalPipeline`` does this with the stage modules in one process (any stage layout, e.g.
an encoder-only stage followed by a decoder stage); ``T5StagePipeline`` does it for this rank
of a spawned process group (``run_spmd``), sending activations with gloo. Both implement the
``Pipeline`` protocol of ``common.engine.pipeline``, so ``run_generation`` drives them like any
decoder-only model. A single stage holding the whole model needs none of this: its ``encode``
already returns the first token's logits.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from common.engine.batch import StageBatch
from common.engine.kv_cache import KVCache
from common.engine.pipeline import StagePipeline
from common.engine.sampling import Sampler
from common.models.config import ModelConfig
from common.models.t5_stage import T5Stage, decoder_start_token_id

Ranges = tuple[tuple[int, int], tuple[int, int]]


def stage_ranges(cfg: ModelConfig, num_stages: int) -> list[Ranges]:
    """RRA layout: (encoder_layer_range, layer_range) per stage, E/N and D/N layers each."""
    from common.models.config import stage_layer_ranges

    if num_stages > min(cfg.num_encoder_layers, cfg.num_layers):
        raise ValueError(f"num_stages={num_stages} exceeds the T5 encoder ({cfg.num_encoder_layers}"
                         f") or decoder ({cfg.num_layers}) layer count")
    return list(zip(stage_layer_ranges(cfg.num_encoder_layers, num_stages),
                    stage_layer_ranges(cfg.num_layers, num_stages), strict=True))


def check_layout(cfg: ModelConfig | None, ranges: list[Ranges]) -> None:
    """Stages in pipeline order must tile the encoder layers and the decoder layers, each
    contiguous from 0; the stages holding encoder layers must come first (a stage after them
    reads its input as the finished encoder output). No encoder layers at all is a decode-only
    pipeline (a WAA decoder worker that imports the cross K/V)."""
    if cfg is None or not ranges:
        raise ValueError("a T5 pipeline needs at least one stage")
    has_encoder = [r[0][1] > r[0][0] for r in ranges]
    if has_encoder != sorted(has_encoder, reverse=True):
        raise ValueError(f"T5 stages with encoder layers must come first: {ranges}")
    for kind, total, index in (("encoder", cfg.num_encoder_layers, 0),
                               ("decoder", cfg.num_layers, 1)):
        pos = 0
        for r in ranges:
            first, last = r[index]
            if first != last and first != pos:
                raise ValueError(f"T5 stage {kind} ranges {[r[index] for r in ranges]} are not "
                                 "contiguous from 0")
            pos = max(pos, last)
        if pos != total and not (kind == "encoder" and pos == 0):
            raise ValueError(f"T5 stage {kind} ranges {[r[index] for r in ranges]} do not cover "
                             f"all {total} {kind} layers")


def _start_batch(batch: StageBatch, cfg: ModelConfig, device: torch.device) -> StageBatch:
    start = [decoder_start_token_id(cfg)] * batch.num_seqs
    return StageBatch.from_tokens(batch.req_ids, start, device)


class T5LocalPipeline:
    """Several T5 stages in one process; activations are handed from module to module."""

    def __init__(self, stages: list[T5Stage]) -> None:
        check_layout(stages[0].cfg if stages else None,
                     [(s.encoder_layer_range, s.layer_range) for s in stages])
        self.stages = stages
        self.cfg = stages[0].cfg
        last_cache = stages[-1].cache
        assert last_cache is not None
        self.cache: KVCache = last_cache
        self.device = torch.device(stages[0].device)
        self.sampler = Sampler()

    def encode(self, batch: StageBatch) -> list[int]:
        if not self.stages[0].has_encoder:
            raise ValueError("this T5 pipeline holds no encoder layers: import the requests' "
                             "KV (cross K/V) and decode instead")
        x, encoder_out = batch, None
        for stage in self.stages[:-1]:
            out = stage.encode(x)
            if stage.encoder_end:
                encoder_out = out
            x = batch.with_hidden(out)
        out = self.stages[-1].encode(x)
        if self.stages[-1].encode_gives_logits:
            return self.sampler.sample(batch.req_ids, out)
        encoder_out = out if self.stages[-1].encoder_end else encoder_out
        assert encoder_out is not None
        for stage in self.stages:
            if stage.needs_encoder_out:
                stage.encode(StageBatch(batch.req_ids, batch.seq_lens, hidden=encoder_out,
                                        extra={"encoder_out": encoder_out}))
        return self.decode(_start_batch(batch, self.cfg, self.device))

    def decode(self, batch: StageBatch) -> list[int]:
        x, out = batch, None
        for stage in self.stages:
            if stage.has_decoder:
                out = stage.decode(x)
                x = batch.with_hidden(out)
        assert out is not None
        return self.sampler.sample(batch.req_ids, out)

    def free(self, req_id: str) -> None:
        for stage in self.stages:
            stage.free(req_id)
        self.sampler.remove(req_id)

    def order(self) -> list[str]:
        for stage in self.stages:
            stage.compact()
        return self.cache.order()


class T5StagePipeline(StagePipeline):
    """This rank's stage of an RRA pipeline in a spawned group (see the module docstring)."""

    def encode(self, batch: StageBatch) -> list[int]:
        from common.engine.dist import recv_activation, send_activation

        topo, stage = self.topo, self.stage
        if topo.num_stages == 1:
            return super().encode(batch)
        shape = (batch.num_tokens, self.hidden_size)
        x = batch
        if not topo.is_first:
            src = topo.rank_of(topo.stage - 1, topo.tp_rank)
            x = batch.with_hidden(recv_activation(shape, src, stage.dtype).to(self.device))
        out = stage.encode(x)
        if not topo.is_last:
            send_activation(out, topo.rank_of(topo.stage + 1, topo.tp_rank))
            last = topo.rank_of(topo.num_stages - 1, topo.tp_rank)
            encoder_out = recv_activation(shape, last, stage.dtype).to(self.device)
            stage.encode(StageBatch(batch.req_ids, batch.seq_lens, hidden=encoder_out,
                                    extra={"encoder_out": encoder_out}))
        else:
            for s in range(topo.num_stages - 1):
                send_activation(out, topo.rank_of(s, topo.tp_rank))
        return self.decode(_start_batch(batch, stage.cfg, self.device))


def make_stage_pipeline(cfg: ModelConfig, weights: Any, topo: Any, tp: Any, dtype: str,
                        device: str) -> T5StagePipeline:
    """This rank's stage of the RRA layout, loaded, wrapped for ``run_generation``."""
    from common.models.t5 import build_stage

    layout = stage_ranges(cfg, topo.num_stages)
    check_layout(cfg, layout)
    enc_range, dec_range = layout[topo.stage]
    stage = build_stage(cfg, encoder_layer_range=enc_range, layer_range=dec_range, tp=tp,
                        weights=weights, dtype=dtype, device=device)
    return T5StagePipeline(stage, topo, cfg.hidden_size)


def spmd_main(payload: dict[str, Any], rank: int, world_size: int) -> list[list[dict]]:
    """Entry point for ``run_spmd``: several generation runs on one spawned group, each with
    its own ``tp_size * num_stages == world_size`` layout (spawning torch ranks is slow)."""
    from common.engine.dist import Topology, make_tp_groups
    from common.engine.generate import GenerateJob, check_prompts, run_generation
    from common.models.registry import load_model_spec

    outputs = []
    for run in payload["runs"]:
        topo = Topology(run["tp_size"], run["num_stages"], rank)
        if topo.world_size != world_size:
            raise ValueError(f"run layout {run['tp_size']}x{run['num_stages']} does not fill "
                             f"the {world_size} ranks")
        tp = make_tp_groups(topo)
        job = GenerateJob.from_json(run["job"])
        spec = load_model_spec(job.model, seed=job.seed)
        check_prompts(job.prompts, spec.config)
        pipe = make_stage_pipeline(spec.config, spec.weights, topo, tp, job.dtype,
                                   payload.get("device", "cpu"))
        results = run_generation(pipe, job.prompts, job.sampling, spec.config,
                                 kv_save_dir=job.kv_save_dir, kv_load_dir=job.kv_load_dir,
                                 rank=rank)
        outputs.append([asdict(r) for r in results])
    return outputs
