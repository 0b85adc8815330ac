"""Step times and memory of stages and pipelines, from a profile.

A pipeline of P stages runs m micro-batches round-robin; one *round* (every micro-batch
advancing one step) takes ``max(sum_s t_s, m * max_s t_s)``: latency-bound when the pipeline is
not full, throughput-bound when it is. A round that starts on an *empty* pipeline (RRA's
encode round: the streams start their cycles together, after decode passes far shorter than an
encode) cannot overlap its fill with earlier work: its m passes leave the last stage after
``sum_s t_s + (m - 1) * max_s t_s`` (``fill_time``; m identical jobs in a flow shop).
Decode contexts are the tokens each sequence attends to
(decoder-only: prompt + generated so far; T5: input via cross-attention + generated).

**Fixed per-pass overhead.** On the mesh every stage pass also pays a cost that does not grow
with the batch: the coordinator's round trip, message framing, the worker's Python around the
engine call, the stage hand-off. The profile's per-layer rows cannot see it (they time one
layer inside one process), so it comes from the mesh itself (``coordinator/bench/calibrate.py``
fits it from measured runs) and lives in ``meta["mesh_overhead_s"]``, one value per kind of
pass (``PASS_KINDS``): a pipeline stage pass (RRA, static, continuous: encode or decode), a WAA
encoder stage pass, a WAA decoder stage iteration, and a KV hand-off. Each stage pass adds its
kind's value once; an absent key is 0 (analytic profiles, uncalibrated measured ones), which
leaves every time bit for bit what it was.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from coordinator.planner.layout import Pipeline, Stage
from coordinator.planner.profile import Profile

MEMORY_RESERVE = 0.9  # fraction of a worker's memory usable for weights + KV (rest: workspace)
PASS_KINDS = ("stage", "waa_encode", "waa_decode", "handoff")  # keys of meta["mesh_overhead_s"]


def mesh_overheads(meta: dict[str, Any]) -> dict[str, float]:
    """The fixed per-pass seconds of every kind (0.0 where the profile has none); a bad key or
    a negative value is refused, so a typo cannot silently plan without overhead."""
    given = meta.get("mesh_overhead_s") or {}
    unknown = sorted(set(given) - set(PASS_KINDS))
    if unknown:
        raise ValueError(f"mesh_overhead_s has unknown pass kinds {unknown}; "
                         f"known: {list(PASS_KINDS)}")
    out = {k: float(given.get(k, 0.0)) for k in PASS_KINDS}
    bad = {k: v for k, v in out.items() if not v >= 0.0}
    if bad:
        raise ValueError(f"mesh_overhead_s values must be >= 0 s, got {bad}")
    return out


@dataclass(frozen=True, eq=False)
class Costs:
    profile: Profile

    def __post_init__(self) -> None:
        m = self.profile.model
        d = self.profile.dtype_bytes
        object.__setattr__(self, "hidden_bytes", m.hidden_size * d)
        object.__setattr__(self, "kv_bytes", m.kv_bytes_per_token_per_layer(d))
        object.__setattr__(self, "dec_allreduces", 3 if m.is_encoder_decoder else 2)
        object.__setattr__(self, "overhead", mesh_overheads(self.profile.meta))

    def fixed(self, kind: str | None) -> float:
        """Fixed seconds one stage pass of ``kind`` pays on the mesh (None: none, for a cost
        that is part of a pass already charged)."""
        return 0.0 if kind is None else self.overhead[kind]

    # ---- compute -----------------------------------------------------------------------------
    def expected_encode(self, pipe: Pipeline, batch: int, stats: Any, kind: str = "stage"
                        ) -> list[float]:
        """Per-stage encode time of ``batch`` inputs averaged over batch compositions
        (``stats.encode_nodes``), plus the fixed overhead of a ``kind`` pass; memoised per
        (pipeline, batch), since the search revisits each B_E often, and per distinct stage,
        since pipelines repeat stages."""
        cache = self.__dict__.setdefault("_enc_cache", {})
        pipes = self.__dict__.setdefault("_enc_pipe_cache", {})
        fixed = self.fixed(kind)
        item = pipes.get((id(pipe), batch, id(stats), kind))
        if item is not None and item[0] is pipe and item[1] is stats:
            return item[2]
        out = []
        model = self.profile.model
        parts = self.__dict__.setdefault("_enc_parts", {})
        for st in pipe:
            layers = st.num_enc if model.is_encoder_decoder else st.num_dec
            key = (st.tp, layers, st.first, st.last, batch, id(stats))
            if key not in cache:
                means, effs, weights = stats.encode_nodes(batch)
                # one layer's costs per (tp, batch), shared by every stage shape
                parts_key = (st.tp, batch, stats)  # stats itself: kept alive, id stays valid
                if parts_key not in parts:
                    parts[parts_key] = self._encode_parts(st.tp, batch, means, effs)
                t = self._encode_total(parts[parts_key], layers, st.first, st.last)
                cache[key] = (float(weights @ t), stats)
            out.append(cache[key][0] + fixed)
        pipes[id(pipe), batch, id(stats), kind] = (pipe, stats, out)  # objects kept: ids stay valid
        return out

    def encode_stage(self, st: Stage, batch: float, mean_len: Any, eff_len: Any,
                     kind: str | None = "stage") -> Any:
        """One encode pass of ``batch`` ragged inputs through this stage's encode layers, plus
        the fixed overhead of a ``kind`` pass (None: a prefill riding in a pass already
        charged) (``mean_len``/``eff_len`` may be arrays of scenarios: an array comes back)."""
        layers = st.num_enc if self.profile.model.is_encoder_decoder else st.num_dec
        parts = self._encode_parts(st.tp, batch, mean_len, eff_len)
        return self._encode_total(parts, layers, st.first, st.last) + self.fixed(kind)

    def _encode_parts(self, tp: int, batch: float, mean_len: Any, eff_len: Any
                      ) -> dict[str, Any]:
        """One layer + its all-reduces, and (on first use, see ``_encode_total``) the
        embedding, LM head and stage send: they depend on the TP degree and the batch, not
        on the stage's layer count or position."""
        p = self.profile
        tokens = batch * mean_len
        per_layer = p.attn("enc", tp, batch, eff_len) + p.rest("enc", tp, tokens)
        ar = 2 * p.op("allreduce", tp, tokens * self.hidden_bytes)
        return {"layer": per_layer + ar, "args": (tp, batch, tokens)}

    def _encode_total(self, parts: dict[str, Any], layers: int, first: bool, last: bool) -> Any:
        p = self.profile
        tp, batch, tokens = parts["args"]
        t = layers * parts["layer"]
        if first:
            if "embed" not in parts:
                parts["embed"] = p.op("embed", tp, tokens)
            t = t + parts["embed"]
        if last and not p.model.is_encoder_decoder:
            if "lm_head" not in parts:
                parts["lm_head"] = p.op("lm_head", tp, batch)
            t = t + parts["lm_head"]
        if not last:
            if "send" not in parts:
                parts["send"] = p.op("stage_send", 1, tokens * self.hidden_bytes)
            t = t + parts["send"]
        return t if np.ndim(t) else float(t)

    def decode_stage(self, st: Stage, batch: np.ndarray | float, ctx: np.ndarray | float,
                     kind: str = "stage") -> Any:
        """One decode step of ``batch`` sequences on this stage, plus the fixed overhead of a
        ``kind`` pass (an empty step costs nothing): floats in, float out; arrays (one entry
        per step) in, array out."""
        fixed = self.fixed(kind)
        if isinstance(batch, float | int):
            if batch <= 0:
                return 0.0
            return float(self._decode(st, float(batch), float(ctx)) + fixed)
        batch = np.asarray(batch, np.float64)
        return np.where(batch > 0, self._decode(st, batch, ctx) + fixed, 0.0)

    def decode_pipeline(self, pipe: Pipeline, batch: np.ndarray, ctx: np.ndarray,
                        known: tuple[dict[int, Any], dict[tuple[str, int], Any]] | None = None,
                        kind: str = "stage") -> list[np.ndarray]:
        """decode_stage for every stage, computing each TP degree's per-layer cost once
        (``known``: per-layer costs per tp and op costs already computed, see rra_table.py)."""
        batch = np.asarray(batch, np.float64)
        alive = batch > 0
        return self.per_stage(pipe, batch, ctx, lambda t: np.where(alive, t, 0.0), known, kind)

    def per_stage(self, pipe: Pipeline, batch: Any, ctx: Any, finish: Callable[[Any], Any],
                  known: tuple[dict[int, Any], dict[tuple[str, int], Any]] | None = None,
                  kind: str = "stage") -> list[Any]:
        """``finish(_decode(stage, batch, ctx) + fixed(kind))`` for every stage of the pipeline.

        The search's hot path. Pipelines repeat stages (same tp, layer count and position), the
        per-layer cost depends only on tp and the stage-send cost on nothing but the batch, so
        each distinct stage is costed once and each op once; the arithmetic per stage is the
        same as ``_decode``'s, so results are identical."""
        p = self.profile
        layer: dict[int, Any] = dict(known[0]) if known else {}
        ops: dict[tuple[str, int], Any] = dict(known[1]) if known else {}

        def op(name: str, tp: int, size: Any) -> Any:
            if (name, tp) not in ops:
                ops[name, tp] = p.op(name, tp, size)
            return ops[name, tp]

        done = []
        fixed = self.fixed(kind)
        distinct, index = self._distinct_stages(pipe)
        for tp, num_dec, first, last in distinct:
            if tp not in layer:
                layer[tp] = self._decode_layer(tp, batch, ctx)
            t = num_dec * layer[tp]
            if first:
                t = t + op("embed", tp, batch)
            if last:
                t = t + op("lm_head", tp, batch)
            else:
                t = t + op("stage_send", 1, batch * self.hidden_bytes)
            done.append(finish(t + fixed))
        return [done[i] for i in index]

    def _distinct_stages(self, pipe: Pipeline
                         ) -> tuple[list[tuple[int, int, bool, bool]], list[int]]:
        """The pipeline's distinct (tp, decoder layers, first, last) stages in order of first
        appearance, and each stage's index among them (memoised per pipeline object)."""
        cache = self.__dict__.setdefault("_distinct", {})
        item = cache.get(id(pipe))
        if item is None or item[0] is not pipe:
            keys: dict[tuple[int, int, bool, bool], int] = {}
            index = [keys.setdefault((st.tp, st.num_dec, st.first, st.last), len(keys))
                     for st in pipe]
            item = cache[id(pipe)] = (pipe, list(keys), index)
        return item[1], item[2]

    def _decode_layer(self, tp: int, batch: Any, ctx: Any) -> Any:
        p = self.profile
        per_layer = p.attn("dec", tp, batch, ctx) + p.rest("dec", tp, batch)
        return per_layer + self.dec_allreduces * p.op("allreduce", tp, batch * self.hidden_bytes)

    def _decode(self, st: Stage, batch: Any, ctx: Any, layer: Any = None) -> Any:
        p = self.profile
        if layer is None:
            layer = self._decode_layer(st.tp, batch, ctx)
        t = st.num_dec * layer
        if st.first:
            t = t + p.op("embed", st.tp, batch)
        if st.last:
            t = t + p.op("lm_head", st.tp, batch)
        else:
            t = t + p.op("stage_send", 1, batch * self.hidden_bytes)
        return t

    def handoff(self, pipe: Pipeline, tokens: float) -> float:
        """KV of ``tokens`` encoded tokens sent to each decoder stage (in parallel per rank)."""
        p = self.profile
        shards = {(st.num_dec, st.tp) for st in pipe}  # stages repeat: each shard size once
        return max(float(p.op("kv_handoff", 1, tokens * self.kv_bytes * num_dec / tp))
                   for num_dec, tp in shards) + self.fixed("handoff")

    # ---- memory ------------------------------------------------------------------------------
    def weight_bytes(self, st: Stage) -> float:
        """Weights one worker of the stage holds (TP shards everything by tp)."""
        cache = self.__dict__.setdefault("_weights", {})
        if st not in cache:
            cache[st] = self._weight_bytes(st)
        return cache[st]

    def pipeline_weights(self, pipe: Pipeline) -> list[float]:
        """weight_bytes of every stage; memoised per pipeline object (pipelines are built once
        per layout by build_pipeline, and hashing every stage per candidate is measurable)."""
        cache = self.__dict__.setdefault("_pipe_weights", {})
        item = cache.get(id(pipe))
        if item is None or item[0] is not pipe:
            item = cache[id(pipe)] = (pipe, [self.weight_bytes(st) for st in pipe])
        return item[1]

    def weighted_stages(self, pipe: Pipeline, distinct: bool = False
                        ) -> list[tuple[Stage, float]]:
        """(stage, weight bytes) for every stage, or (``distinct``) one per memory shape:
        stages with the same weights, layer counts and tp hold the same memory, so a peak
        over the distinct ones is the peak over all (memoised per pipeline object)."""
        if not distinct:
            return list(zip(pipe, self.pipeline_weights(pipe), strict=True))
        cache = self.__dict__.setdefault("_distinct_weights", {})
        item = cache.get(id(pipe))
        if item is None or item[0] is not pipe:
            seen: dict[tuple[float, int, int, int], tuple[Stage, float]] = {}
            for st, w in zip(pipe, self.pipeline_weights(pipe), strict=True):
                seen.setdefault((w, st.num_enc, st.num_dec, st.tp), (st, w))
            item = cache[id(pipe)] = (pipe, list(seen.values()))
        return item[1]

    def _weight_bytes(self, st: Stage) -> float:
        m, d = self.profile.model, self.profile.dtype_bytes
        params = st.num_dec * m.params_per_layer("decoder")
        if m.is_encoder_decoder:
            params += st.num_enc * m.params_per_layer("encoder")
        if st.first:
            params += m.embedding_params()
        if st.last and st.num_dec:
            params += m.lm_head_params()
        return params * d / st.tp

    def kv_bytes_held(self, st: Stage, tokens: float) -> float:
        return tokens * self.kv_bytes * st.num_dec / st.tp

    def encoder_kv_bytes(self, st: Stage, tokens: float) -> float:
        """KV an encoder stage holds until handed off (T5: cross K/V for every decoder layer,
        produced in proportion to the encoder layers the stage runs)."""
        m = self.profile.model
        if m.is_encoder_decoder:
            share = st.num_enc / m.num_encoder_layers
        else:
            share = st.num_dec / m.num_layers
        return tokens * self.kv_bytes * m.num_layers * share / st.tp

    @property
    def capacity(self) -> float:
        if "_capacity" not in self.__dict__:
            self.__dict__["_capacity"] = self.profile.memory_bytes * MEMORY_RESERVE
        return self.__dict__["_capacity"]


def round_time(stage_times: list[np.ndarray], num_micro: int) -> np.ndarray:
    """Time for ``num_micro`` micro-batches to each pass every stage once (see module doc)."""
    if all(isinstance(t, float) for t in stage_times):  # one step: the same sum, faster
        flat = np.array(stage_times, np.float64)
        return np.maximum(flat.sum(), num_micro * flat.max())
    stacked = np.stack([np.asarray(t, np.float64) for t in stage_times])
    return np.maximum(stacked.sum(axis=0), num_micro * stacked.max(axis=0))


def fill_time(stage_times: list[float], num_micro: int) -> float:
    """Time for ``num_micro`` identical passes, sent together into an empty pipeline, to all
    leave it: the first takes every stage's time, each later one the slowest stage's more."""
    return float(sum(stage_times) + (num_micro - 1) * max(stage_times))


def lockstep_round(stage_times: list[np.ndarray], streams: int, alive: np.ndarray,
                   own: list[np.ndarray] | None = None) -> np.ndarray:
    """Expected time of one round of ``streams`` lock-stepped streams (RRA), each inside a
    step of its cycle with probability ``alive`` independently and then costing
    ``stage_times``: k live streams take ``max(sum_s t_s, k max_s t_s)`` (``round_time``),
    none take nothing. The cycle goes on while any stream is alive, and a round of one live
    stream costs its whole traverse, so this is not the all-streams round scaled by
    ``alive``. ``own``: the stage times of one more stream known to be alive (a request
    waiting for its tokens); k others alive then take ``max(sum_s own_s, max_s(own_s + k
    t_s))``."""
    times = np.stack([np.asarray(t, np.float64) for t in stage_times])
    q = np.asarray(alive, np.float64)
    others = streams - 1 if own is not None else streams
    k = np.arange(others + 1, dtype=np.float64)[:, None]
    weight = np.stack([math.comb(others, j) * q**j * (1.0 - q) ** (others - j)
                       for j in range(others + 1)])
    if own is None:
        rounds = np.maximum(times.sum(axis=0), k * times.max(axis=0))
        rounds[0] = 0.0
    else:
        mine = np.stack([np.asarray(t, np.float64) for t in own])
        rounds = np.maximum(mine.sum(axis=0), (mine[None] + k[:, :, None] * times[None]
                                               ).max(axis=1))
    return (weight * rounds).sum(axis=0)
