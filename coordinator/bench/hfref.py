"""The external reference: `transformers` `generate` with static batching, on the same model
file and the same prompts (what a user would otherwise do).

Runs in its own process (`python -m coordinator.bench.hfref IN.json OUT.json`) so the bench
process never imports torch. Requests go in order, ``batch`` at a time, left-padded; each batch
generates its longest request's length (EOS ignored unless natural EOS: ``min_new_tokens``),
so finished rows keep computing, as static batching does. A streamer stamps the time every
step's tokens exist; a request's result reaches its user when its batch returns (``t_finish``).
One torch thread, like each mesh worker (more threads spin against each other on a loaded
machine); the mesh has one core per worker, so per core the reference has the same hardware.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def reference_problem(model: str | None) -> str | None:
    """Why transformers cannot load ``model`` (None: it can)."""
    if model is None:
        return "the null model has no weights"
    path = Path(model)
    if path.suffix == ".gguf" and path.is_file():
        return None
    if path.is_dir() and (path / "config.json").is_file():
        return None
    return f"{model!r} is not a .gguf file or an HF model directory (random-weight preset?)"


def load_model(model: str, dtype: str) -> Any:
    """An HF directory through ``from_pretrained``; a GGUF file as ``LlamaForCausalLM`` with
    the weights our loader reads (transformers' own GGUF path converts the tokenizer and
    dequantizes for minutes on this machine), as `exegpt bench engine` does."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(model)
    if path.suffix != ".gguf":
        return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    from common.models.registry import load_model_spec
    from coordinator.commands._engine_bench import TransformersDecoder

    return TransformersDecoder(load_model_spec(model), dtype).model


class _Stamps:
    """A transformers streamer that only records when each step's tokens exist."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.time())

    def end(self) -> None:
        pass


def run_batch(model: Any, prompts: list[list[int]], lens: list[int], natural_eos: bool,
              pad_id: int) -> list[dict[str, Any]]:
    """One static batch; per request: tokens produced and timestamps (RequestRecord fields)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    new = max(lens)
    stamps = _Stamps()
    start = time.time()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                             min_new_tokens=1 if natural_eos else new, do_sample=False,
                             pad_token_id=pad_id, streamer=stamps)
    end = time.time()
    steps = stamps.times[1:]  # the first put() is the prompt
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    records = []
    for row, (prompt, n) in enumerate(zip(prompts, lens, strict=True)):
        gen = out[row, width:].tolist()[:n]
        if natural_eos:
            gen = gen[:next((i + 1 for i, t in enumerate(gen) if t in eos_ids), len(gen))]
        records.append({
            "input_len": len(prompt), "output_len": n, "num_tokens": len(gen),
            "finish_reason": "length" if len(gen) == n else "stop", "error": None,
            "t_arrival": start, "t_encode_start": start, "t_encode_end": steps[0] if steps else end,
            "t_first_token": steps[0] if steps else end, "t_finish": end,
            "t_tokens": steps[:len(gen)]})
    return records


def main(argv: list[str]) -> int:
    import torch

    job = json.loads(Path(argv[0]).read_text())
    torch.set_num_threads(int(job["threads"]))
    started = time.time()
    model = load_model(job["model"], job["dtype"])
    load_s = time.time() - started
    pad = model.generation_config.pad_token_id
    eos = model.generation_config.eos_token_id
    pad_id = int(pad if pad is not None else (eos[0] if isinstance(eos, list) else eos or 0))
    reqs, batch = job["requests"], int(job["batch"])
    run_batch(model, [reqs[0]["prompt_ids"][:8]], [2], True, pad_id)  # warm-up
    records: list[dict[str, Any]] = []
    for i in range(0, len(reqs), batch):
        chunk = reqs[i:i + batch]
        records += run_batch(model, [r["prompt_ids"] for r in chunk],
                             [r["output_len"] for r in chunk], bool(job["natural_eos"]), pad_id)
    Path(argv[1]).write_text(json.dumps({"records": records, "load_s": load_s,
                                         "torch_threads": torch.get_num_threads()}))
    return 0


def run_reference(model: str, dtype: str, requests: list[Any], *, batch: int, threads: int,
                  natural_eos: bool, workdir: Path, timeout_s: float) -> dict[str, Any]:
    """Run the reference in a child process; its records and load time (RuntimeError if it
    fails, with the tail of its stderr)."""
    workdir.mkdir(parents=True, exist_ok=True)
    job_path, out_path = workdir / "hfref-job.json", workdir / "hfref-out.json"
    job_path.write_text(json.dumps({
        "model": model, "dtype": dtype, "batch": batch, "threads": threads,
        "natural_eos": natural_eos,
        "requests": [{"prompt_ids": list(r.prompt_ids), "output_len": r.output_len}
                     for r in requests]}))
    proc = subprocess.run([sys.executable, "-m", "coordinator.bench.hfref", str(job_path),
                           str(out_path)], capture_output=True, text=True, timeout=timeout_s,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"transformers reference exited {proc.returncode}: "
                           f"{proc.stderr.strip()[-800:]}")
    return dict(json.loads(out_path.read_text()))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
