"""BenchConfig: what one `exegpt bench` invocation runs, validated before anything starts.

Policy names are the user's (`exegpt` = the planner's own choice among RRA and WAA); each maps
to the planner's policy family. Bounds are seconds on the SLA-(b) latency (a request of the
workload's p99 output length, from the start of its encode); ``None`` means no bound.

Every plan is searched under a concurrency cap (the planner's ``max_in_flight``): by default
K // 2 requests in flight, so that K requests fill every plan twice and each run measures a
steady state rather than a fill and drain (docs/bench.md); ``--max-in-flight 0`` lifts it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

# user policy name -> planner policy family (coordinator.planner.planning.POLICY_CHOICES)
POLICY_FAMILIES = {"exegpt": "auto", "static": "static", "continuous": "continuous",
                   "rra": "rra", "waa": "waa"}
DEFAULT_POLICIES = ("exegpt", "static", "continuous")
BOUND_MODES = ("auto", "predicted")  # auto: measure the static baseline on the mesh
QUICK_REQUESTS = 12
DEFAULT_REQUESTS = 48


def parse_policies(text: str) -> tuple[str, ...]:
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in names if p not in POLICY_FAMILIES]
    if bad or not names:
        raise ValueError(f"--policies: unknown {bad or text!r}; choose from "
                         f"{','.join(POLICY_FAMILIES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--policies lists a policy twice: {text!r}")
    return names


def parse_bounds(text: str) -> str | tuple[float | None, ...]:
    """``auto`` / ``predicted``, or seconds ``L1,L2,...`` (``inf`` or ``none``: no bound)."""
    if text in BOUND_MODES:
        return text
    out: list[float | None] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part.lower() in ("inf", "none"):
            out.append(None)
            continue
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"--bounds: {part!r} is not a number of seconds, 'inf', "
                             f"or one of {BOUND_MODES}") from None
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"--bounds: {part!r} must be > 0 seconds (use inf for no bound)")
        out.append(value)
    if not out:
        raise ValueError("--bounds is empty")
    return tuple(out)


@dataclass(frozen=True)
class BenchConfig:
    """One evaluation. ``model`` is a .gguf file, HF directory or preset; with ``null_model``
    it must be a preset (its shape sizes the null workers' payloads)."""

    model: str
    workload: str = "S"
    workers: int = 2
    bounds: str | tuple[float | None, ...] = "auto"
    requests: int = DEFAULT_REQUESTS
    policies: tuple[str, ...] = DEFAULT_POLICIES
    repeats: int = 1
    out: Path = Path("bench-out")
    quick: bool = False
    natural_eos: bool = False
    seed: int = 0
    null_model: bool = False
    profile: str | None = None  # profile JSON or analytic:GPU:MODEL; None: cached/measured
    dtype: str = "bfloat16"
    bound_batches: tuple[int, ...] = ()  # static batch sizes for the bounds; () = default grid
    reference: bool = True  # the transformers `generate` reference
    reference_batch: int = 8
    calibrate: bool = True  # scale the profile by the baseline runs' contention (auto bounds)
    startup_timeout_s: float = 300.0
    request_timeout_s: float = 900.0
    max_in_flight: int | None = None  # None: K // 2 (the default); 0: no cap; N: at most N

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.requests < 2:
            raise ValueError(f"--requests must be >= 2 (a throughput needs two), got "
                             f"{self.requests}")
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")
        parse_policies(",".join(self.policies))
        if isinstance(self.bounds, str) and self.bounds not in BOUND_MODES:
            raise ValueError(f"bounds must be one of {BOUND_MODES} or a tuple of seconds")
        if any(b < 1 for b in self.bound_batches):
            raise ValueError(f"bound batch sizes must be >= 1, got {self.bound_batches}")
        if self.reference_batch < 1:
            raise ValueError(f"--reference-batch must be >= 1, got {self.reference_batch}")
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"--dtype must be bfloat16 or float32, got {self.dtype!r}")
        if self.max_in_flight is not None and self.max_in_flight < 0:
            raise ValueError(f"--max-in-flight must be >= 0 (0: no cap), got "
                             f"{self.max_in_flight}")

    @property
    def in_flight_cap(self) -> int | None:
        """The planner's ``max_in_flight`` for every plan (None: no cap)."""
        if self.max_in_flight is None:
            return self.requests // 2
        return self.max_in_flight or None

    @property
    def runs_dir(self) -> Path:
        """Mesh logs of every run, under the output directory."""
        return self.out / "runs"
