"""``measure_profile``: the XProfiler's measuring side, run on the real engine and transport.

    measure_profile(model, tp_sizes) --for each tp--> run_spmd(tp ranks, gloo, 1 thread each)
        rank: one-layer stages (random weights) -> encode/decode/lm_head cells -> all-reduce
    --once--> run_spmd(2 ranks): KVHandoff and activation frames over ZeroMQ
    -> {"meta": ..., "rows": [...]}   (the format of coordinator/planner/profile.py)

Children exchange only JSON with the parent (``common.engine.dist.run_spmd``); rank 0 reports
progress through a file that the parent shows as a rich progress bar.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.models.config import ModelConfig
from common.profiling.grid import Grid

DTYPES = ("bfloat16", "float32")


def resolve_model(model: str | Path | ModelConfig) -> ModelConfig:
    """A ModelConfig, a preset name, a Hugging Face directory or a ``.gguf`` file."""
    if isinstance(model, ModelConfig):
        return model
    text = str(model)
    if text in ModelConfig.preset_names():
        return ModelConfig.preset(text)
    path = Path(text)
    if text.endswith(".gguf") and path.is_file():
        from common.models.gguf_loader import config_from_gguf
        from common.models.gguf_meta import open_gguf

        return config_from_gguf(open_gguf(path), path)
    if path.is_dir():
        from common.models.registry import config_from_hf, read_hf_config

        return config_from_hf(read_hf_config(path))
    raise ValueError(f"{text!r} is neither a model preset, a model directory nor a .gguf file "
                     f"(presets: {ModelConfig.preset_names()})")


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """The engine's sharding rules, checked before any process starts."""
    kv = cfg.kv_heads
    problems = []
    if tp < 1:
        problems.append("must be >= 1")
    elif cfg.num_heads % tp:
        problems.append(f"does not divide num_heads={cfg.num_heads}")
    elif cfg.ffn_size % tp:
        problems.append(f"does not divide ffn_size={cfg.ffn_size}")
    elif kv % tp and tp % kv:
        problems.append(f"neither divides nor is a multiple of num_kv_heads={kv}")
    if problems:
        good = [d for d in range(1, cfg.num_heads + 1) if cfg.num_heads % d == 0
                and cfg.ffn_size % d == 0 and (kv % d == 0 or d % kv == 0)]
        raise ValueError(f"tp_size={tp} {problems[0]}; valid TP degrees for this model: {good}")


def _check_args(dtype: str, device: str, tp_sizes: Sequence[int], num_threads: int) -> None:
    if dtype not in DTYPES:
        extra = " (float16 runs at ~1 GFLOP/s on CPUs)" if dtype == "float16" else ""
        raise ValueError(f"cannot measure in dtype {dtype!r}{extra}; use one of {DTYPES}")
    if device != "cpu":
        raise ValueError(f"measuring on device {device!r} is not supported: the profiler times "
                         "CPU passes (no device synchronisation); use --device cpu or an "
                         "analytic profile (--analytic a40|a100|h100)")
    if not tp_sizes:
        raise ValueError("give at least one TP degree")
    if num_threads < 1:
        raise ValueError("num_threads must be >= 1")


def measure_profile(model: str | Path | ModelConfig, tp_sizes: Sequence[int] = (1,),
                    dtype: str = "bfloat16", device: str = "cpu", *, quick: bool = False,
                    progress: bool = True, grid: Grid | None = None, num_threads: int = 1,
                    timeout_s: float = 3600.0, isolate: bool = True,
                    transport: bool = True) -> dict[str, Any]:
    """Measure per-layer, embedding/LM-head, all-reduce and transfer costs on this machine.

    Each TP rank runs in its own process with ``num_threads`` torch threads (the workers'
    setting). ``quick`` uses a tiny grid (seconds; for tests); ``grid`` overrides both.
    ``isolate=False`` measures tp=1 in this process instead of a fresh one (faster start);
    ``transport=False`` skips the stage_send/kv_handoff rows (compute only)."""
    from common.profiling.comm import slowest_rank_rows

    cfg = resolve_model(model)
    tp_sizes = tuple(sorted(set(int(t) for t in tp_sizes)))
    _check_args(dtype, device, tp_sizes, num_threads)
    for tp in tp_sizes:
        check_tp(cfg, tp)
    grid = (grid or (Grid.quick() if quick else Grid.full())).fit_to(cfg.max_position)
    payload = {"model": cfg.to_dict(), "grid": grid.to_json(), "dtype": dtype,
               "device": device, "num_threads": num_threads}
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    overhead: list[dict[str, Any]] = []
    # the tp=2 group, when there is one, also measures the transport (saves a process start)
    piggyback = transport and 2 in tp_sizes
    with _Reporter(progress, _total_units(grid, tp_sizes, transport)) as report:
        for tp in tp_sizes:
            job = dict(payload, transport=piggyback and tp == 2)
            if tp == 1 and not isolate:
                results = [_in_process(job)]
            else:
                results = report.run("common.profiling.measure:spmd_layers", job, tp, timeout_s)
            rows += slowest_rank_rows([r["rows"] for r in results])
            overhead += slowest_rank_rows([r["overhead"] for r in results],
                                          key=("phase", "tp", "batch", "seq_len"))
        if transport and not piggyback:
            rows += report.run("common.profiling.measure:spmd_transport", payload, 2,
                               timeout_s)[0]
    meta = _meta(cfg, dtype, device, num_threads, grid, tp_sizes)
    meta["pass_overhead"] = overhead
    meta["measure_seconds"] = round(time.perf_counter() - started, 1)
    return {"meta": meta, "rows": rows}


def _in_process(job: dict[str, Any]) -> dict[str, Any]:
    """tp=1 in this process (tests: saves a process start); the thread count is restored."""
    import torch

    from common.profiling.timing import use_clock

    threads = torch.get_num_threads()
    try:
        return spmd_layers(job, 0, 1)
    finally:
        torch.set_num_threads(threads)
        use_clock("wall")


def _total_units(grid: Grid, tp_sizes: Sequence[int], transport: bool) -> int:
    from common.profiling.layers import num_units

    per_tp = num_units(grid)
    return sum(per_tp + (len(grid.allreduce_bytes) if tp > 1 else 0) for tp in tp_sizes) \
        + (len(grid.transport_bytes) if transport else 0)


def _meta(cfg: ModelConfig, dtype: str, device: str, num_threads: int, grid: Grid,
          tp_sizes: Sequence[int]) -> dict[str, Any]:
    import torch

    return {
        "device": device, "dtype": dtype, "torch_version": torch.__version__,
        "num_threads": num_threads, "model": cfg.to_dict(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "source": "measured",
        "cpu": _cpu_name(), "num_cpus": os.cpu_count(), "memory_bytes": _ram_bytes(),
        "grid": grid.to_json(),
        "compute_clock": {str(tp): clock_for(num_threads, tp) for tp in tp_sizes},
        "split": "attention = end of each attention input projection (qkv; T5 cross q) to the "
                 "start of its output projection o; rest = layer - attention - all-reduces",
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return float("inf")


class _Reporter:
    """Runs the spawned groups, showing rank 0's progress file as a rich progress bar."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total
        self.dir = tempfile.TemporaryDirectory(prefix="exegpt-profile-")
        self.done_before = 0
        self.bar: Any = None

    def __enter__(self) -> _Reporter:
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("[bold]profile[/]"), BarColumn(),
                                TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                                TextColumn("{task.description}"), transient=False)
            self.bar.start()
            self.task = self.bar.add_task("starting", total=self.total)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
        self.dir.cleanup()

    def run(self, target: str, payload: dict[str, Any], world_size: int,
            timeout_s: float) -> list[Any]:
        from common.engine.dist import run_spmd

        path = Path(self.dir.name) / f"progress-{target.rsplit(':')[1]}-{world_size}.json"
        job = dict(payload, progress=str(path) if self.enabled else None)
        if self.bar is None:
            return run_spmd(target, job, world_size, timeout_s)
        box: dict[str, Any] = {}
        thread = threading.Thread(target=self._spawn, args=(box, target, job, world_size,
                                                            timeout_s), daemon=True)
        thread.start()
        done = 0
        while thread.is_alive():
            thread.join(0.25)
            done, label = _read(path)
            self.bar.update(self.task, completed=self.done_before + done,
                            description=label or "starting processes")
        self.done_before += _read(path)[0]
        if "error" in box:
            raise box["error"]
        return box["result"]

    @staticmethod
    def _spawn(box: dict[str, Any], target: str, job: dict[str, Any], world_size: int,
               timeout_s: float) -> None:
        from common.engine.dist import run_spmd

        try:
            box["result"] = run_spmd(target, job, world_size, timeout_s)
        except BaseException as exc:  # re-raised in the calling thread
            box["error"] = exc


def _read(path: Path) -> tuple[int, str]:
    from common.profiling.timing import read_progress

    return read_progress(path)


# ---- entry points of the spawned ranks (JSON in, JSON out) ---------------------------------
def clock_for(num_threads: int, tp_size: int) -> str:
    """Thread CPU time when every rank has a core of its own and one thread (see timing.py);
    wall time when ranks share cores (their waiting for each other is then real cost)."""
    fits = tp_size * num_threads <= (os.cpu_count() or 1)
    return "cpu" if num_threads == 1 and fits else "wall"


def _setup(payload: dict[str, Any], world_size: int) -> tuple[ModelConfig, Grid, Any]:
    import torch

    from common.profiling.timing import use_clock

    torch.set_num_threads(int(payload["num_threads"]))
    use_clock(clock_for(int(payload["num_threads"]), world_size))
    return (ModelConfig.from_dict(payload["model"]), Grid.from_json(payload["grid"]),
            getattr(torch, payload["dtype"]))


def spmd_layers(payload: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    import torch.distributed as dist

    from common.profiling.comm import measure_allreduce, measure_transport
    from common.profiling.layers import layer_rows, measure_layers, overhead_rows
    from common.profiling.timing import Group, ProgressFile, TimedTP

    cfg, grid, dtype = _setup(payload, world_size)
    group = dist.group.WORLD if world_size > 1 else None
    tp = TimedTP(tp_size=world_size, tp_rank=rank, group=group)
    sync = Group(world_size, group)
    progress = ProgressFile(payload.get("progress"), rank == 0)
    samples = measure_layers(cfg, tp, grid, payload["dtype"], payload["device"], sync, progress)
    rows = layer_rows(samples, grid, world_size)
    if world_size > 1:
        rows += measure_allreduce(tp, grid, dtype, sync, progress)
    if payload.get("transport"):
        rows += measure_transport(cfg, grid, dtype, rank, progress)
    return {"rows": rows, "overhead": overhead_rows(samples, world_size)}


def spmd_transport(payload: dict[str, Any], rank: int, world_size: int) -> list[dict[str, Any]]:
    from common.profiling.comm import measure_transport
    from common.profiling.timing import ProgressFile

    cfg, grid, dtype = _setup(payload, world_size)
    return measure_transport(cfg, grid, dtype, rank, ProgressFile(payload.get("progress"),
                                                                  rank == 0))
