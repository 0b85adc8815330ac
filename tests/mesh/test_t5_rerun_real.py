"""A decoder of a real T5 WAA mesh SIGKILLed mid-stream (issue 7): the re-run replays.

A tiny random T5 (tests/runner/tinymodels.py) served by one encoder and two decoders. Once
every request is streaming, dec0 is killed; what it held is re-run on dec1 from the prompt
alone (the streamed tokens are decoder-side: appending them to the encoder input would be
wrong), and the coordinator drops the regenerated tokens the client already has after
checking them. Checked on the raw wire: every stream is gap-free, repeat-free and equals
transformers' greedy output (greedy requests) or in-process ``exegpt generate`` with the same
seed (seeded sampled ones: each draw depends on (seed, output position) only, so the replay
draws the same); the re-run requests were cut mid-stream and replayed what they had.
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from common import protocol as P
from common.engine.generate import generate
from common.engine.sampling import SamplingParams
from coordinator.commands.serve import model_fields
from coordinator.launch import LaunchSpec, LocalMesh, WorkerGroup
from tests.mesh.test_tp_rank_kill_real import all_streaming, check_killed_run, stream_and_act
from tests.runner.tinymodels import make_t5

torch.set_num_threads(1)
VOCAB = 96  # make_t5's vocabulary (prompt ids avoid the special ids 0..3)
MAX_NEW = 300  # long enough that dec0 is mid-stream at the kill (its context is 512)
# sampled with a seed; r0 and r5 greedy. A random tiny T5's greedy output soon repeats one
# token (its next token is mostly a function of the last one), so the sampled requests, whose
# rows vary (hot: its logits are peaky), are the ones a wrong re-run cannot pass by luck.
SEEDED = ("r1", "r2", "r3", "r4")


@torch.no_grad()
def t5_greedy(directory: Path, prompt: tuple[int, ...], max_new: int) -> list[int]:
    """transformers' greedy decoding, not stopped at EOS (the requests ignore EOS)."""
    from transformers import T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
    encoded = model.get_encoder()(input_ids=torch.tensor([prompt]))
    step = torch.tensor([[model.config.decoder_start_token_id]])
    past, row = None, []
    for _ in range(max_new):
        out = model(encoder_outputs=encoded, decoder_input_ids=step, past_key_values=past,
                    use_cache=True)
        past, token = out.past_key_values, int(out.logits[0, -1].argmax())
        row.append(token)
        step = torch.tensor([[token]])
    return row


def _sampling(req_id: str) -> P.Sampling:
    if req_id in SEEDED:
        return P.Sampling(temperature=4.0, top_k=60, seed=11 + int(req_id[1:]), ignore_eos=True)
    return P.Sampling(ignore_eos=True)


def expected_outputs(directory: Path, prompts: dict[str, tuple[int, ...]]) -> dict[str, list[int]]:
    out = {r: t5_greedy(directory, p, MAX_NEW) for r, p in prompts.items() if r not in SEEDED}
    sampled = [(r, p) for r, p in prompts.items() if r in SEEDED]
    params = [SamplingParams(max_new_tokens=MAX_NEW, temperature=4.0, top_k=60,
                             seed=_sampling(r).seed, ignore_eos=True) for r, _ in sampled]
    rows = generate(str(directory), [list(p) for _, p in sampled], params, dtype="float32")
    out.update({r: list(row.token_ids) for (r, _), row in zip(sampled, rows, strict=True)})
    return out


@pytest.fixture()
def mesh(tmp_path: Path) -> Iterator[LocalMesh]:
    model = make_t5(tmp_path / "t5")
    spec = LaunchSpec(groups=(WorkerGroup("encoder", 1), WorkerGroup("decoder", 2)),
                      runs_path=tmp_path / "runs", transport="ipc", encode_batch=4,
                      dtype="float32", heartbeat_interval_s=0.25, heartbeat_timeout_s=5.0,
                      drain_timeout_s=1.0, **model_fields(str(model)))
    local = LocalMesh(spec, startup_timeout_s=120)
    local.start()
    yield local
    local.stop(grace_s=20)


def test_a_killed_t5_decoders_requests_replay_and_stream_on_token_exact(
        mesh: LocalMesh) -> None:
    rng = random.Random(3)
    prompts = {f"r{i}": tuple(rng.randrange(4, VOCAB) for _ in range(rng.randint(3, 12)))
               for i in range(6)}
    assert mesh.spec.model is not None
    expected = expected_outputs(Path(mesh.spec.model), prompts)
    assert min(len(set(expected[r])) for r in SEEDED) > 20  # not a degenerate reference
    dec0 = next(c for c in mesh.workers if c.name == "decoder-dec0")
    seen, killed_at = stream_and_act(
        mesh.client_endpoint, prompts, MAX_NEW, all_streaming,
        lambda: os.kill(dec0.pid, signal.SIGKILL), timeout_s=60, sampling=_sampling)
    reruns = check_killed_run(mesh, seen, killed_at, expected)
    cut = [r for r in reruns if 4 <= r["tokens_kept"] < MAX_NEW]
    assert cut, f"no re-run request was cut mid-stream: {reruns}"
    assert all(r["lost"] == "dec0" and r["replay"] == r["tokens_kept"] for r in reruns)
    for r in cut:  # its stream continued across the kill
        times = seen[r["req_id"]].times
        assert times[0] < killed_at < times[-1]
    print(f"\nT5 rerun: {len(reruns)} re-run ({sorted(r['req_id'] for r in reruns)}), "
          f"replayed tokens {sum(r['replay'] for r in reruns)}")
