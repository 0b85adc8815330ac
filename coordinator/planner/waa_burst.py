"""WAA with the encoder as the bottleneck: the decoders see bursts, not a steady batch.

When an encoder period P is longer than a decoder round, the decoders do not run a steady
batch B_D: every P seconds a whole encoded batch of B_E sequences merges at once, the batch is
largest right after and thins out as outputs end (often to nothing before the next batch).
A decode step's cost grows with its batch (on a compute-bound device almost in proportion),
so rounds timed at the time-average batch understate the rounds a request actually runs in:
on SmolLM2-135M on this CPU the discrete-event simulator (des.py) measured 2.7-5x the
time per token and 20-28% more p99-length latency than that steady closed form.

``burst_timeline`` follows the expected batch through time instead ("the expected batch of
every decode iteration", as the paper's XSimulator does for RRA's cycle): cohorts of B_E
become ready every P, join at the first round boundary after that (at once when the decoders
are idle), each round's batch is the sum over live cohorts of B_E * P(S >= k) at the cohort's
k-th step, and the round lasts ``round_at(batch)``. After a few cohort lifetimes the timeline
repeats; the figures are averages over the cohorts of a later window. Throughput is not
changed (the encoder sets it); latency, time per token, the mean and peak decode batch are.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

TAGGED = 3  # cohorts timed with a p99-length request, after the timeline has settled
GRID_STEPS = 64  # round-time table points per B_E of decode batch (linear in between)


@dataclass(frozen=True)
class Burst:
    """Figures of the periodic burst timeline; times from the moment a cohort is ready."""

    to_token: np.ndarray  # [k-1]: mean time from ready to the end of the cohort's k-th step
    to_p99: float  # time from ready to a p99-length request's last token (its cohort tagged)
    mean_batch: float  # decode batch averaged over the rounds that run (the DES's B_D)
    peak_batch: float  # the largest expected batch of any round (memory, decoder capacity)
    busy: float  # fraction of the time the decoders run rounds

    def tpot(self, surv: np.ndarray) -> float:
        """Each request's own time per token, averaged (``own_tpot``)."""
        return own_tpot(surv, self.to_token)


def own_tpot(surv: np.ndarray, to_token: np.ndarray) -> float:
    """Mean (finish - first token) / (S - 1) over requests with S >= 2, as des_measure and the
    bench average it; ``to_token[k-1]`` is the time to a request's k-th token, ``surv[k-1]``
    = P(S >= k). With no request of 2 tokens or more: the time to the first token."""
    pmf = surv - np.append(surv[1:], 0.0)
    s = np.arange(1, surv.size + 1)
    multi = s >= 2
    if not multi.any() or pmf[multi].sum() <= 0:
        return float(to_token[0])
    per = (to_token[multi] - to_token[0]) / (s[multi] - 1)
    return float((pmf[multi] * per).sum() / pmf[multi].sum())


class RoundTable:
    """round_at(batch) by linear interpolation on a table the caller's vectorised cost fills
    (the search costs thousands of candidates: one vectorised call per table, not per round);
    the table grows when a batch runs past its end."""

    def __init__(self, rounds: Callable[[np.ndarray], np.ndarray], unit: float) -> None:
        self._rounds, self._step = rounds, unit / GRID_STEPS
        self._fill(4 * GRID_STEPS)

    def _fill(self, points: int) -> None:
        grid = np.arange(points + 1, dtype=np.float64) * self._step
        self._table = [float(v) for v in self._rounds(grid)]
        self._end = points

    def __call__(self, batch: float) -> float:
        x = batch / self._step
        i = int(x)
        if i >= self._end:
            self._fill(2 * max(self._end, i + 1))
        lo = self._table[i]
        return lo + (x - i) * (self._table[i + 1] - lo)


def burst_timeline(b_e: float, period: float, surv: np.ndarray,
                   round_at: Callable[[float], float], s99: int) -> Burst:
    """The timeline above; ``surv[k-1]`` = P(S >= k). Latency is timed for a tagged request
    of the p99 length ``s99``: its cohort holds it plus B_E - 1 ordinary draws, so a small
    cohort's batch does not thin out under it (untagged, a B_E = 1 run read 18% short)."""
    if period <= 0 or b_e <= 0:
        raise ValueError("a burst timeline needs a positive encoder period and batch")
    need = b_e * np.asarray(surv, np.float64)  # expected sequences at a cohort's k-th step
    s_max = need.size
    tag = need.copy()
    tag[:s99] = 1.0 + (b_e - 1.0) * surv[:s99]
    with np.errstate(divide="ignore"):  # log P(no sequence of the cohort is at step k)
        none = b_e * np.log1p(-np.minimum(np.asarray(surv, np.float64), 1.0))
    none_tag = none.copy()
    none_tag[:s99] = -np.inf  # the tagged request is there until its last token
    # cohorts alive at once: the longest lifetime, s_max rounds at the steady batch (Little's
    # law at the encoder's rate, b = B_E E[S] round(b) / P, iterated up from one cohort)
    b = float(need[0])
    for _ in range(8):
        b = max(float(need[0]), float(need.sum()) * round_at(b) / period)
    alive = max(1, math.ceil(s_max * round_at(b) / period))
    first = alive + 2  # timeline settled: two lifetimes of earlier cohorts have run
    gap = alive + 1  # tagged cohorts far enough apart not to share a round
    last = first + TAGGED * gap  # measured: cohorts [first, last)
    tagged = set(range(first, last, gap))
    # A round's sums over the live cohorts are kept ahead of time: a cohort joining at round
    # j adds its whole step profile (need[k], ...) to rounds j .. j + s_max - 1 of four
    # accumulators, so a round reads its sums instead of looping over the cohorts. The
    # additions happen in join order, the order the sums over the live cohorts were taken
    # in, so the floats are the same.
    acc = np.zeros((4, 4 * s_max))  # per round: b0, log_empty0 (untagged), b, log_empty
    plain, tagged_rows = np.stack([need, none, need, none]), np.stack([need, none, tag,
                                                                        none_tag])
    live: collections.deque[tuple[int, int]] = collections.deque()  # (cohort, join round)
    joined: dict[int, int] = {}  # cohort -> its join round, for the timed ones
    ends: list[float] = []  # [round]: the time the round ended
    nxt, t, rnd = 0, 0.0, 0
    batches: list[float] = []
    busy = runs = 0.0
    t_lo = first * period
    while True:
        if not live:  # idle until the next cohort is ready
            t = max(t, nxt * period)
        while nxt * period <= t:
            if rnd + s_max > acc.shape[1]:
                acc = np.concatenate([acc, np.zeros_like(acc)], axis=1)
            acc[:, rnd:rnd + s_max] += tagged_rows if nxt in tagged else plain
            live.append((nxt, rnd))
            if first <= nxt < last:
                joined[nxt] = rnd
            nxt += 1
        b0, log_empty0, b, log_empty = (float(v) for v in acc[:, rnd])
        # a round runs only if one of its cohorts' sequences is there (each cohort's B_E
        # draws independently alive: P(empty) = prod (1 - P(S >= k))^B_E), and then with
        # b / P(run) of them: a cohort's thin tail costs its expected rounds
        run = -math.expm1(log_empty)
        r = run * round_at(b / run) if run > 0 else 0.0
        t += r
        ends.append(t)
        if t > t_lo:
            batches.append(b0)
            runs += -math.expm1(log_empty0)
            busy += r
        rnd += 1
        while live and live[0][1] + s_max <= rnd:  # its s_max-th step was this round
            live.popleft()
        if nxt > last and (not live or live[0][0] >= last):
            break
    done_at = np.full((last - first, s_max), np.nan)
    ended = np.asarray(ends)
    for c, j in joined.items():
        steps = min(s_max, ended.size - j)
        done_at[c - first, :steps] = ended[j:j + steps] - c * period
    span = t - t_lo
    rows = sorted(c - first for c in tagged)
    return Burst(to_token=np.nanmean(done_at, axis=0),
                 to_p99=float(np.mean(done_at[rows, s99 - 1])),
                 mean_batch=sum(batches) / runs, peak_batch=max(batches),
                 busy=min(1.0, busy / span) if span else 1.0)
