"""Dynamic B_E adjustment (ExeGPT's XRunner): size each encode batch so that its input-token sum
and the decoders' running batch stay inside the plan's bands around their averages.

The plan's B_E was chosen for the workload's average lengths; real batches drift (a batch of
long prompts costs more encode time, a decode batch that swells slows every token). Before each
encode batch the coordinator asks :meth:`BatchSizer.size` how many queued requests to take:

    start at the plan's B_E;
    decode batch above its band  -> scale down by band_hi / decode batch (decoders overloaded);
    decode batch below its band  -> scale up by band_lo / decode batch (at most 2 x B_E);
    then move the cut so the batch's token sum lies in its band (never below 1 request,
    never above the cap), taking requests in arrival order.

Bands come from the plan (``Plan.adjust``: mean +- 2 sigma); without bands the size is B_E.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Band:
    lo: float
    hi: float

    def __post_init__(self) -> None:
        if not 0 <= self.lo <= self.hi:
            raise ValueError(f"an adjustment band needs 0 <= lo <= hi, got [{self.lo}, {self.hi}]")

    @staticmethod
    def parse(text: str | None) -> Band | None:
        """``"LO,HI"`` (what the launcher passes) or None."""
        if not text:
            return None
        try:
            lo, hi = (float(x) for x in text.split(","))
        except ValueError as exc:
            raise ValueError(f"an adjustment band is LO,HI (two numbers), got {text!r}") from exc
        return Band(lo, hi)


@dataclass(frozen=True)
class Decision:
    size: int
    reason: str  # "plan" when the size is B_E, else what moved it


class BatchSizer:
    """Stateless rule; see the module docstring."""

    def __init__(self, plan_batch: int, cap: int, token_sum: Band | None = None,
                 decode_batch: Band | None = None) -> None:
        if plan_batch < 1 or cap < 1:
            raise ValueError("B_E and the batch cap must be >= 1")
        self.plan_batch, self.cap = plan_batch, cap
        self.token_sum, self.decode_batch = token_sum, decode_batch

    def size(self, prompt_lens: Sequence[int], running: int) -> Decision:
        """How many of the queued requests (their prompt lengths, in order) the batch takes,
        given ``running`` sequences on the decoders now."""
        limit = min(self.cap, 2 * self.plan_batch)
        n, reasons = self.plan_batch, []
        band = self.decode_batch
        if band is not None and running > band.hi:
            n = max(1, int(self.plan_batch * band.hi / running))
            reasons.append(f"decode batch {running} > {band.hi:.1f}")
        elif band is not None and running < band.lo:
            n = min(limit, max(n, round(self.plan_batch * band.lo / max(running, 1))))
            reasons.append(f"decode batch {running} < {band.lo:.1f}")
        n = max(1, min(n, limit, len(prompt_lens)))
        if self.token_sum is not None and prompt_lens:
            n, why = self._fit_tokens(prompt_lens, n, limit)
            if why:
                reasons.append(why)
        if n == self.plan_batch or (n == len(prompt_lens) and not reasons):
            return Decision(n, "plan")
        return Decision(n, "; ".join(reasons) or "plan")

    def _fit_tokens(self, lens: Sequence[int], n: int, limit: int) -> tuple[int, str]:
        assert self.token_sum is not None
        band, total = self.token_sum, sum(lens[:n])
        if total > band.hi and n > 1:
            while n > 1 and total > band.hi:
                n -= 1
                total -= lens[n]
            return n, f"token sum over {band.hi:.0f}"
        if total < band.lo:
            grown = n
            while grown < min(limit, len(lens)) and total < band.lo \
                    and total + lens[grown] <= band.hi:
                total += lens[grown]
                grown += 1
            if grown != n:
                return grown, f"token sum under {band.lo:.0f}"
        return n, ""
