"""The per-machine profile cache behind `exegpt up`: measure once, plan from it every time.

A profile is only valid for the machine state it was measured in, so its cache key holds
everything that changes the timings: the model (name plus a hash of its shape), the device,
the dtype, the torch version and the number of torch threads per worker. The files live in
``$XDG_CACHE_HOME/exegpt`` (default ``~/.cache/exegpt``); deleting one forces a re-measure.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from common.models.config import ModelConfig

# Wall time of a full-grid `exegpt profile` of SmolLM2-135M (1 thread, tp 1): 7 min 13 s on the
# 2-vCPU development machine while other jobs shared it (1 min 51 s of CPU time); shown to the
# user as an expectation.
PROFILE_MINUTES_HINT = "a few minutes (about 7 on a busy 2-core machine)"

Measure = Callable[..., dict[str, Any]]


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/exegpt``, else ``~/.cache/exegpt`` (the XDG base-directory rule)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "exegpt"


def torch_version() -> str:
    """Read from package metadata: importing torch here would cost seconds for nothing."""
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError as exc:
        raise ValueError("torch is not installed; exegpt needs it to measure a profile") from exc


@dataclass(frozen=True)
class ProfileKey:
    """Everything a measured profile depends on; two equal keys may share one file."""

    label: str  # a readable model name for the file (e.g. the GGUF's file stem)
    model: ModelConfig
    device: str
    dtype: str
    torch_version: str
    num_threads: int
    tp_sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if not self.tp_sizes or min(self.tp_sizes) < 1:
            raise ValueError(f"tp_sizes must be positive, got {self.tp_sizes}")

    @property
    def model_hash(self) -> str:
        shape = {k: v for k, v in self.model.to_dict().items() if k != "name"}
        text = json.dumps(shape, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    def filename(self) -> str:
        tps = "-".join(str(t) for t in self.tp_sizes)
        name = (f"profile-{self.label}-{self.model_hash}-"
                f"{self.device}-{self.dtype}-torch{self.torch_version}-"
                f"t{self.num_threads}-tp{tps}-eng{engine_fingerprint()}.json")
        return re.sub(r"[^A-Za-z0-9._+-]", "_", name)

    def path(self) -> Path:
        return cache_dir() / self.filename()


# the engine, and the profiler that times it (its grid decides where the planner interpolates)
ENGINE_SOURCES = ("common/engine", "common/models", "common/profiling")


@functools.cache
def engine_fingerprint() -> str:
    """A hash of the engine's code (kernels, model layers) and the profiler's (grid, timing): a
    profile times one engine on one grid, and one cached before an engine change would make
    every plan's predictions wrong (the native kernels made decode passes ~0.6x of the
    profile measured before them)."""
    root = Path(__file__).resolve().parents[2]
    digest = hashlib.sha256()
    for sub in ENGINE_SOURCES:
        for path in sorted((root / sub).rglob("*")):
            if path.suffix in (".py", ".c") and path.is_file():
                digest.update(path.relative_to(root).as_posix().encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:8]


def valid_tp_sizes(cfg: ModelConfig, max_tp: int) -> tuple[int, ...]:
    """TP degrees up to ``max_tp`` the engine can shard this model over (heads, FFN, KV heads)."""
    kv = cfg.kv_heads
    return tuple(d for d in range(1, max_tp + 1)
                 if cfg.num_heads % d == 0 and cfg.ffn_size % d == 0
                 and (kv % d == 0 or d % kv == 0))


def load_or_measure(key: ProfileKey, *, say: Callable[[str], None],
                    measure: Measure | None = None, quick: bool = False) -> tuple[Any, Path, bool]:
    """The cached profile for ``key`` (measuring and saving it first when missing).

    Returns ``(Profile, path, measured_now)``. ``measure`` defaults to
    ``common.profiling.measure_profile`` (the machinery of `exegpt profile`).
    """
    from coordinator.planner.profile import Profile

    path = key.path()
    if path.is_file():
        try:
            profile = Profile.load(path)
            profile.check_compatible(key.model, key.dtype)
            return profile, path, False
        except (ValueError, KeyError, OSError) as exc:
            say(f"cached profile {path} is unusable ({exc}); measuring a new one")
    if measure is None:
        from common.profiling import measure_profile as measure
    say(f"profiling {key.label} on this machine ({key.device}, {key.dtype}, "
        f"{key.num_threads} thread(s), tp {','.join(map(str, key.tp_sizes))}): first run only, "
        f"{'a quick grid, under a minute' if quick else PROFILE_MINUTES_HINT}; "
        f"cached in {path}")
    started = time.monotonic()
    data = measure(key.model, key.tp_sizes, key.dtype, key.device, quick=quick,
                   num_threads=key.num_threads)
    profile = Profile(meta=data["meta"], rows=data["rows"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    profile.save(tmp)
    tmp.replace(path)  # atomic: an interrupted run never leaves half a profile in the cache
    say(f"profiled in {time.monotonic() - started:.0f} s")
    return profile, path, True
