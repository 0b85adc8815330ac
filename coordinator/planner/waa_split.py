"""WAA's encoder/decoder split: how many workers encode, by the WAA-C or WAA-M rule.

WAA-C gives the encoders the share of workers that balances compute per encoded batch, WAA-M
the share that balances memory; the split is the size nearest that share whose two groups can
hold the TP workers (the paper leaves the rounding open). Memoised: the search asks it for
every B_E of every WAA run.
"""

from __future__ import annotations

from bisect import bisect_left
from functools import lru_cache

import numpy as np

from coordinator.planner.candidate import Candidate, WorkloadStats
from coordinator.planner.costs import Costs
from coordinator.planner.layout import build_pipeline, split_tp_workers


def waa_share(cand: Candidate, stats: WorkloadStats, costs: Costs) -> float:
    """Ideal encoder workers: WAA-C balances compute per encoded batch, WAA-M balances memory.
    Depends only on the policy, B_E and the worker count (memoised: asked at every B_E of
    every WAA run)."""
    cache = costs.__dict__.setdefault("_waa_share", {})
    key = (cand.policy, cand.B_E, cand.num_workers, id(stats))
    if key not in cache:
        cache[key] = (_waa_share(cand, stats, costs), stats)  # stats kept alive: id stays valid
    return cache[key][0]


def _waa_share(cand: Candidate, stats: WorkloadStats, costs: Costs) -> float:
    whole = build_pipeline(costs.profile, [1], enc=True, dec=True)
    assert whole is not None
    st = whole[0]
    b_d = cand.B_E * stats.mean_s
    if cand.policy == "waa-c":
        need_e = costs.encode_stage(st, cand.B_E, stats.mean_in, stats.eff_in, "waa_encode")
        ctx = np.array([stats.in_decode_weighted + stats.mean_age])
        # one round per batch
        need_d = float(costs.decode_stage(st, np.array([b_d]), ctx, "waa_decode")[0])
    else:
        enc_tokens = cand.B_E * stats.mean_in
        dec_tokens = b_d * (stats.in_decode_weighted + stats.mean_age)
        weights = costs.weight_bytes(st)
        enc_weights = weights if not costs.profile.model.is_encoder_decoder else weights / 2
        need_e = enc_weights + costs.kv_bytes_held(st, enc_tokens)
        need_d = weights + costs.kv_bytes_held(st, dec_tokens)
    return cand.num_workers * need_e / (need_e + need_d)


@lru_cache(maxsize=65536)
def nearest_split(share: float, num_workers: int, tp: int, num_tp_workers: int) -> int:
    """The split nearest the ideal share whose groups can hold the TP workers (0: none)."""
    fits = _fitting_splits(num_workers, tp, num_tp_workers)
    if not fits:
        return 0
    # fits is sorted: the nearest is one of the two around ``share`` (ties: the smaller)
    i = bisect_left(fits, share)
    near = fits[max(i - 1, 0):i + 1]
    return min(near, key=lambda n: (abs(n - share), n))


@lru_cache(maxsize=4096)
def _fitting_splits(num_workers: int, tp: int, num_tp_workers: int) -> tuple[int, ...]:
    """Encoder-group sizes whose two groups can hold the TP workers (pure; asked per B_E)."""
    return tuple(n for n in range(1, num_workers) if split_tp_workers(
        n, num_workers - n, tp, num_tp_workers) is not None)


def waa_split(cand: Candidate, stats: WorkloadStats, costs: Costs) -> int:
    if cand.num_encoders:
        return cand.num_encoders  # given (the live workers), not chosen
    share = waa_share(cand, stats, costs)
    return nearest_split(share, cand.num_workers, cand.tp, cand.num_tp_workers)
