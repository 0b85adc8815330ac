"""A real model's stage in a staged WAA plan (coordinator/waa_pipeline.py): the encoder side
exports the KV of its layers after each encode pass, the decoder side assembles each request's
KV from the encoder stages before its first decode pass.

    encoder stage [a, b)   encode pass (template of common.backend_stage) -> for each request
                           and each route (decoder stage k, layers [a,b) & [c_k,d_k)): export
                           -> the loop sends them as KVHandoffs, then ``drop`` frees the batch
    decoder stage [c, d)   KVHandoffs -> ``pending`` (parts, layers covered) until [c, d) is
                           whole; the first decode pass naming the request ``join``s it: the
                           parts go into that micro-batch's cache, the request into ``seqs``
                           (the last stage adds its sampler; one token is already out)

T5 (common.backend_waa_stage_t5): only the last encoder stage exports, the cross K/V of every
decoder layer; no token is out when a request joins (its first pass feeds the start token).

A request freed before it joined (finished at its first token, cancelled) leaves ``pending``
and its id is remembered (``TOMBSTONES`` of them) with its arrival time, so KV of that run
arriving after the free is dropped instead of stranded, while a new request reusing the id
(another ``t_arrival`` in the KVHandoff's lifecycle) is taken.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from common import protocol as P
from common.backend_engine import sampling_params
from common.backend_stage import PassOutput, StageSeq
from common.backend_stage_engine import EngineStageBackend
from common.backend_waa_stage_t5 import SELF_NAMES, init_t5_stage
from common.engine.kv_cache import KVExport
from common.engine.sampling import FINISH_LENGTH, finish_reason
from common.engine.tp import TPGroup
from common.models.registry import ModelSpec
from common.tensorframe import to_wire

Range = tuple[int, int]
TOMBSTONES = 65536


class WaaSide(EngineStageBackend):
    """A stage of either pipeline; T5 builds its side's stage (common.backend_waa_stage_t5).
    ``layer_range`` is the stage's layers of its side's stack (T5's encoder side: of the
    encoder stack)."""

    side = ""
    kv_names = SELF_NAMES  # the KV tensors the handoff carries
    emits_first_token = True  # the encoder side samples token 0 (T5: the decoder side does)
    first_position = 1  # the output position a request's first decode step samples

    def __init__(self, spec: ModelSpec, layer_range: Range | None = None,
                 encoder_layer_range: Range | None = None, dtype: str = "bfloat16",
                 device: str = "cpu", tp: TPGroup | None = None,
                 encoder_out_onward: bool = True) -> None:
        if spec.config.is_encoder_decoder:
            init_t5_stage(self, spec, self.side, layer_range, dtype, device, tp)
        else:
            super().__init__(spec, layer_range, encoder_layer_range, dtype, device, tp=tp,
                             encoder_out_onward=encoder_out_onward)


class WaaEncoderStage(WaaSide):
    """Encode passes only; every request leaves after its pass (its KV went to decoders)."""

    side = "encoder"

    def export_batch(self, req_ids: list[str], stream: int) -> dict[str, KVExport]:
        """Each request's KV over this stage's layers and every KV head (a TP group gathers
        its ranks' heads: common.backend_waa_stage_tp)."""
        cache = self._cache(stream)
        return {r: _only(cache.export(self._name(r)), self.kv_names) for r in req_ids}

    def _compute(self, sp: P.StagePass) -> Any:
        """T5's last encoder stage writes the cross K/V and samples nothing (the module
        docstring of common.backend_waa_stage_t5); otherwise the engine stage's encode."""
        if self.emits_first_token or not self.is_last:
            return super()._compute(sp)
        ids = [t for req in sp.requests for t in req.prompt_ids] if self.is_first else None
        hidden = None if self.is_first else sp.hidden.as_torch()  # type: ignore[union-attr]
        self._forward("encode", sp.stream, [self._name(r) for r in sp.req_ids],
                      [len(req.prompt_ids) for req in sp.requests], ids, hidden)
        return PassOutput()

    def check(self, sp: P.StagePass) -> None:
        if sp.kind != "encode":
            raise ValueError(f"pass {sp.pass_id}: an encoder stage runs encode passes, not "
                             f"{sp.kind!r}")
        super().check(sp)


def _only(exp: KVExport, names: tuple[str, ...]) -> KVExport:
    return dataclasses.replace(exp, tensors={n: exp.tensors[n] for n in names})


def payload(req_id: str, exp: KVExport, layers: Range) -> P.KVPayload:
    """The wire form of ``layers`` (global, within the export) of one request's KV."""
    lo, hi = layers[0] - exp.layer_start, layers[1] - exp.layer_start
    return P.KVPayload(req_id=req_id, seq_len=exp.seq_len, layer_start=layers[0],
                       layer_end=layers[1], head_start=exp.head_start, head_end=exp.head_end,
                       num_kv_heads=exp.num_kv_heads,
                       tensors={n: to_wire(t[lo:hi].contiguous())
                                for n, t in exp.tensors.items()})


@dataclass
class PendingKV:
    """A request's KV parts received so far, and what a decoder stage needs to run it."""

    prompt_len: int
    max_new_tokens: int
    sampling: P.Sampling
    arrival: float | None  # the run's t_arrival: tells a reused id's KV from a freed run's
    output_offset: int = 0  # a re-run: the encoder sampled this output position
    parts: list[KVExport] = field(default_factory=list)
    layers: set[int] = field(default_factory=set)
    t_complete: float | None = None


class WaaDecoderStage(WaaSide):
    """Decode passes over micro-batches whose requests arrive as KV from encoder stages."""

    side = "decoder"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pending: dict[str, PendingKV] = {}
        self.prompt_len: dict[str, int] = {}
        self.t_kv_received: dict[str, float] = {}  # joined this pass (last stage reports it)
        self._freed: collections.OrderedDict[str, float | None] = collections.OrderedDict()
        cache = self._template
        self.layers = (cache.layer_start, cache.layer_end)

    # ---- KV arriving --------------------------------------------------------------------
    def take(self, h: P.KVHandoff) -> None:
        """File one KVHandoff; ValueError if it does not fit this stage."""
        if h.req_id in self.seqs or self._late(h):
            return
        kv = h.kv
        unknown = set(kv.tensors) - set(self._template.group_of)
        if unknown:  # before it could reach the cache (or a TP group's wire)
            raise ValueError(f"KV of {h.req_id} carries tensors {sorted(unknown)} this stage's "
                             f"cache does not hold ({sorted(self._template.group_of)})")
        lo, hi = max(kv.layer_start, self.layers[0]), min(kv.layer_end, self.layers[1])
        if lo >= hi:
            raise ValueError(f"KV of {h.req_id} for layers [{kv.layer_start}, {kv.layer_end}) "
                             f"does not touch this stage's layers {list(self.layers)}")
        entry = self.pending.setdefault(h.req_id, PendingKV(
            h.prompt_len, h.max_new_tokens, h.sampling, h.lifecycle.t_arrival,
            h.output_offset))
        tensors = {n: t.as_torch() if hasattr(t, "as_torch") else t
                   for n, t in kv.tensors.items()}
        entry.parts.append(KVExport(req_id=h.req_id, seq_len=kv.seq_len,
                                    layer_start=kv.layer_start, layer_end=kv.layer_end,
                                    head_start=kv.head_start, head_end=kv.head_end,
                                    num_kv_heads=kv.num_kv_heads, tensors=tensors))
        entry.layers.update(range(lo, hi))
        if self.complete(h.req_id):
            entry.t_complete = time.time()

    def _late(self, h: P.KVHandoff) -> bool:
        """KV of a run freed before all of it arrived (True), or of a new run (False)."""
        if h.req_id not in self._freed:
            return False
        freed, arrival = self._freed[h.req_id], h.lifecycle.t_arrival
        if freed is None or freed == arrival:
            self._freed[h.req_id] = arrival  # freed before any part came: now we know the run
            return True
        del self._freed[h.req_id]
        return False

    def complete(self, req_id: str) -> bool:
        entry = self.pending.get(req_id)
        return entry is not None and len(entry.layers) == self.layers[1] - self.layers[0]

    def waiting_for(self, sp: P.StagePass) -> list[str]:
        """Requests of a decode pass whose KV is not all here yet."""
        return [r for r in sp.req_ids if r not in self.seqs and not self.complete(r)]

    # ---- joining a micro-batch ----------------------------------------------------------
    def join(self, sp: P.StagePass) -> None:
        """Move the pass's newly arrived requests into its micro-batch's cache."""
        self.t_kv_received = {}
        cache = self._cache(sp.stream)
        for r in sp.req_ids:
            if r in self.seqs:
                continue
            entry = self.pending.pop(r)
            self.seqs[r] = StageSeq(r, sp.stream, (), entry.max_new_tokens, entry.sampling,
                                    num_generated=self.first_position)
            self.prompt_len[r] = entry.prompt_len
            name = self._name(r)
            self._stream_of[name] = sp.stream
            for part in entry.parts:
                cache.import_(dataclasses.replace(part, req_id=name))
            if self.is_last:
                # the encoder sampled position output_offset (T5: this pass samples 0; its
                # re-runs replay from 0), as whole-model WAA: the same seeded draws
                self.sampler.add(r, sampling_params(entry.sampling, entry.max_new_tokens),
                                 position=entry.output_offset + self.first_position)
            self.t_kv_received[r] = entry.t_complete or time.time()

    # ---- leaving ------------------------------------------------------------------------
    def drop(self, req_ids: Any) -> None:
        ids = list(req_ids)
        for r in ids:
            if r not in self.seqs:
                entry = self.pending.pop(r, None)
                self._freed[r] = entry.arrival if entry is not None else None
                if len(self._freed) > TOMBSTONES:
                    self._freed.popitem(last=False)
            self.prompt_len.pop(r, None)
        super().drop(ids)

    def check(self, sp: P.StagePass) -> None:
        if sp.kind != "decode":
            raise ValueError(f"pass {sp.pass_id}: a decoder stage runs decode passes, not "
                             f"{sp.kind!r}")
        super().check(sp)

    def _finish(self, seq: StageSeq, token: int) -> str | None:
        params = self.sampler.params(seq.req_id)
        reason = finish_reason(token, seq.num_generated, params, self.model.eos_token_ids)
        if reason is None and self._context_full(self.prompt_len.get(seq.req_id, 0),
                                                 seq.num_generated):
            reason = FINISH_LENGTH
        return reason

    @property
    def num_active(self) -> int:
        return len(self.seqs) + len(self.pending)
