"""The real-model backends of the WAA workers: the engine's stages behind the backend slots.

    encoder worker:  EngineEncodeBackend.encode(items)
                     prefill (decoder-only) or encoder + first decoder step (T5) on one ragged
                     batch -> first token of each request (sampled here) -> each request's KV
                     exported from the stage's cache as wire tensors, then freed at once
    decoder worker:  EngineDecodeBackend.add(seq) imports the KV into its own cache;
                     step() runs one decode iteration over every running sequence, frees a
                     finished sequence the moment it stops and compacts the cache so the batch
                     stays a contiguous run of slots (the engine's generation loop, spread
                     over two processes)

Both sides build their stage with ``common.models.registry.build_stage`` from the same model
path (HF directory, .gguf or preset); the coordinator never imports this module (torch).
A T5 encoder worker holds the decoder too (its encode pass yields the first token, so the KV
it hands over already holds the start token's self-attention K/V); its decoder worker holds
no encoder layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from common import protocol as P
from common.backend import DecodeSeq, Encoded, EncodeItem, StepToken
from common.engine.batch import StageBatch
from common.engine.kv_cache import KVExport
from common.engine.sampling import FINISH_LENGTH, Sampler, SamplingParams, finish_reason
from common.engine.tp import TPGroup
from common.models.config import ModelConfig
from common.models.registry import ModelSpec, build_stage, load_model_spec
from common.tensorframe import to_wire

DTYPES = ("bfloat16", "float32")


def sampling_params(sampling: P.Sampling | None, max_new_tokens: int) -> SamplingParams:
    """The wire's sampling fields as the engine's value (one vocabulary end to end)."""
    s = sampling or P.Sampling()
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=s.temperature,
                          top_k=s.top_k, top_p=s.top_p, seed=s.seed,
                          stop_token_ids=tuple(s.stop_token_ids), ignore_eos=s.ignore_eos)


def load_spec(model: str) -> ModelSpec:
    """The model every worker of the mesh loads (each process: one intra-op thread)."""
    torch.set_num_threads(1)
    return load_model_spec(model)


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")


class EngineEncodeBackend:
    """A whole-model stage that only runs encode passes; its cache holds a batch at a time."""

    def __init__(self, spec: ModelSpec, dtype: str = "bfloat16", device: str = "cpu",
                 tp: TPGroup | None = None) -> None:
        _check_dtype(dtype)
        self.cfg: ModelConfig = spec.config
        self.stage = build_stage(self.cfg, weights=spec.weights, dtype=dtype, device=device,
                                 tp=tp or TPGroup.single())
        self.device = torch.device(device)

    def encode(self, items: Sequence[EncodeItem]) -> list[Encoded]:
        if not items:
            return []
        ids = [item.req_id for item in items]
        for item in items:
            check_prompt(item, self.cfg)
        sampler = Sampler()
        for item in items:
            sampler.add(item.req_id, sampling_params(item.sampling, item.max_new_tokens),
                        position=item.output_offset)  # a re-run continues the seeded draws
        batch = StageBatch.from_prompts(ids, [list(item.prompt) for item in items], self.device)
        try:
            first = sampler.sample(ids, self.stage.encode(batch))
            out = []
            for item, token in zip(items, first, strict=True):
                exp = self.stage.cache.export(item.req_id)
                out.append(Encoded(req_id=item.req_id, first_token=int(token),
                                   seq_len=exp.seq_len,
                                   kv={name: to_wire(t) for name, t in exp.tensors.items()}))
            return out
        finally:
            for r in ids:
                if r in self.stage.cache:
                    self.stage.free(r)
            self.stage.compact()

    def idle(self) -> None:
        """Nothing to keep alive in a single process."""

    def close(self) -> None:
        """Nothing to release beyond what the process exit frees."""


def check_prompt(item: EncodeItem, cfg: ModelConfig) -> None:
    if len(item.prompt) > cfg.max_position:
        raise ValueError(f"request {item.req_id}: prompt of {len(item.prompt)} tokens exceeds "
                         f"the model's context of {cfg.max_position}")
    bad = [t for t in item.prompt if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ValueError(f"request {item.req_id}: token ids {bad[:5]} outside the vocabulary "
                         f"(size {cfg.vocab_size})")


class EngineDecodeBackend:
    """The running batch of one decoder worker (the DecodeBackend protocol)."""

    def __init__(self, spec: ModelSpec, dtype: str = "bfloat16", device: str = "cpu",
                 tp: TPGroup | None = None) -> None:
        _check_dtype(dtype)
        self.cfg: ModelConfig = spec.config
        kwargs: dict[str, Any] = {}
        if self.cfg.is_encoder_decoder:
            kwargs["encoder_layer_range"] = (0, 0)  # the encoder runs on the encoder workers
        self.stage = build_stage(self.cfg, weights=spec.weights, dtype=dtype, device=device,
                                 tp=tp or TPGroup.single(), **kwargs)
        self.device = torch.device(device)
        self.sampler = Sampler()
        self._seqs: dict[str, DecodeSeq] = {}
        self._last: dict[str, int] = {}

    @property
    def num_active(self) -> int:
        return len(self._seqs)

    def idle(self) -> None:
        """Nothing to keep alive in a single process."""

    def close(self) -> None:
        """Nothing to release beyond what the process exit frees."""

    def first_reason(self, seq: DecodeSeq) -> str | None:
        """Why a sequence stops at its first token (EOS, a stop token, max_new_tokens 1)."""
        params = sampling_params(seq.sampling, seq.max_new_tokens)
        reason = finish_reason(seq.first_token, 1, params, self.cfg.eos_token_ids)
        if reason is None and self._context_full(seq.prompt_len, 1):
            reason = FINISH_LENGTH
        return reason

    def add(self, seq: DecodeSeq) -> None:
        if seq.req_id in self._seqs:
            raise ValueError(f"request {seq.req_id} is already decoding here")
        cache = self.stage.cache
        first, last = seq.head_range or (cache.head_start, cache.head_end)
        tensors = {name: t.as_torch() if hasattr(t, "as_torch") else t
                   for name, t in seq.kv.items()}
        seq_len = int(tensors["k"].shape[2]) if "k" in tensors else seq.prompt_len
        layers = seq.layer_range or (cache.layer_start, cache.layer_end)
        exp = KVExport(req_id=seq.req_id, seq_len=seq_len, layer_start=layers[0],
                       layer_end=layers[1], head_start=first, head_end=last,
                       num_kv_heads=cache.num_kv_heads,
                       tensors={n: t.to(cache.dtype) for n, t in tensors.items()})
        cache.import_(exp)
        if seq.req_id not in cache:
            raise ValueError(f"request {seq.req_id}: the KV sent (layers {layers}, "
                             f"heads [{first}, {last})) does not cover this decoder")
        self.register(seq)

    def register(self, seq: DecodeSeq) -> None:
        """Track a sequence whose KV is in the cache: its sampler and its last token."""
        # the encoder sampled output position output_offset (0 unless a re-run): continue
        self.sampler.add(seq.req_id, sampling_params(seq.sampling, seq.max_new_tokens),
                         position=seq.output_offset + seq.num_generated)
        self._seqs[seq.req_id] = seq
        self._last[seq.req_id] = seq.first_token

    def remove(self, req_id: str) -> None:
        if self._seqs.pop(req_id, None) is not None:
            self._last.pop(req_id, None)
            self.stage.free(req_id)
            self.sampler.remove(req_id)

    def step(self) -> list[StepToken]:
        """One decode iteration over the whole running batch."""
        if not self._seqs:
            return []
        self.stage.compact()
        order = [r for r in self.stage.cache.order() if r in self._seqs]
        batch = StageBatch.from_tokens(order, [self._last[r] for r in order], self.device)
        out = self.finish_step(order, self.sampler.sample(order, self.stage.decode(batch)))
        for tok in out:
            if tok.finished:
                self.remove(tok.req_id)
        return out

    def finish_step(self, order: list[str], tokens: list[int]) -> list[StepToken]:
        """Count each sequence's new token and decide which ones stop (EOS, stop token,
        max_new_tokens, or a full context); the caller frees the finished ones."""
        out = []
        for r, token in zip(order, tokens, strict=True):
            seq = self._seqs[r]
            position = seq.num_generated
            seq.num_generated += 1
            self._last[r] = token
            reason = finish_reason(token, seq.num_generated, self.sampler.params(r),
                                   self.cfg.eos_token_ids)
            if reason is None and self._context_full(seq.prompt_len, seq.num_generated):
                reason = FINISH_LENGTH
            out.append(StepToken(r, int(token), position, reason is not None, reason))
        return out

    def _context_full(self, prompt_len: int, generated: int) -> bool:
        """The next decode would need a position past the model's context."""
        used = generated + 1 if self.cfg.is_encoder_decoder else prompt_len + generated
        return used > self.cfg.max_position
