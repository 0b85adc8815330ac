"""`exegpt up --demo`: real prompts through the SDK, then the numbers that matter vs the plan.

The batch mixes two kinds of request, sent at once so the mesh runs the plan's batching:
chat questions that stop at the model's end-of-sequence token (the answers a user reads), and
"p99-length probes" that ignore end-of-sequence and generate exactly the workload's p99 output
length. The bound the plan was made for (SLA-(b), the paper's) is on the latency of a
p99-length request, so the probes measure exactly that number; chat answers alone would stop
early and say nothing about it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

DEMO_QUESTIONS = (
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about autumn leaves.",
    "What is 12 times 12?",
    "Give three tips for writing clear code.",
    "Who wrote Romeo and Juliet?",
    "What does a CPU cache do?",
    "Name the planets of the solar system.",
    "How do vaccines train the immune system?",
    "Translate 'good morning' into Spanish.",
    "What is the boiling point of water at sea level?",
    "Summarise the plot of Cinderella in one sentence.",
)


@dataclass(frozen=True)
class DemoRequest:
    """One request of the demo batch; ``probe`` ones ignore EOS and run to the p99 length."""

    question: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    stop_token_ids: tuple[int, ...]
    probe: bool = False

    def __post_init__(self) -> None:
        if not self.prompt_ids or self.max_new_tokens < 1:
            raise ValueError("a demo request needs a prompt and max_new_tokens >= 1")


@dataclass(frozen=True)
class Answer:
    request: DemoRequest
    text: str
    num_tokens: int
    latency_s: float
    ttft_s: float | None
    error: str | None = None


@dataclass(frozen=True)
class DemoOutcome:
    answers: tuple[Answer, ...]
    wall_s: float
    bound_s: float
    predicted: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> tuple[Answer, ...]:
        return tuple(a for a in self.answers if a.error is None)

    @property
    def failed(self) -> tuple[Answer, ...]:
        return tuple(a for a in self.answers if a.error is not None)

    @property
    def throughput_seq_s(self) -> float:
        return len(self.ok) / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def throughput_tok_s(self) -> float:
        return sum(a.num_tokens for a in self.ok) / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def p99_length_latency_s(self) -> float | None:
        """The slowest probe (a p99-length request): what the SLA-(b) bound is about."""
        probes = [a.latency_s for a in self.ok if a.request.probe]
        return max(probes) if probes else None

    @property
    def within_bound(self) -> bool:
        lat = self.p99_length_latency_s
        return lat is not None and lat <= self.bound_s


def build_requests(tokenizer: Any, *, num_requests: int, num_probes: int, p99_output: int,
                   max_output: int, vocab_size: int) -> list[DemoRequest]:
    """Chat-templated questions (stop at EOS) plus ``num_probes`` p99-length probes.

    Without a tokenizer (a model file with no vocabulary) the prompts are fixed token ids."""
    if num_probes > num_requests or num_requests < 1:
        raise ValueError(f"need 1 <= probes <= requests, got {num_probes} of {num_requests}")
    out = []
    for i in range(num_requests):
        question = DEMO_QUESTIONS[i % len(DEMO_QUESTIONS)]
        ids = _prompt_ids(tokenizer, question, vocab_size)
        probe = i >= num_requests - num_probes
        stops = () if probe or tokenizer is None else tuple(tokenizer.eos_token_ids)
        out.append(DemoRequest(question, ids, p99_output if probe else max_output, stops, probe))
    return out


def _prompt_ids(tokenizer: Any, question: str, vocab_size: int) -> tuple[int, ...]:
    if tokenizer is None:
        return tuple((ord(c) * 7 + i) % vocab_size for i, c in enumerate(question))
    if tokenizer.chat_template:
        return tuple(tokenizer.encode_chat([{"role": "user", "content": question}]))
    return tuple(tokenizer.encode(question))


async def run_batch(endpoint: str, requests: Sequence[DemoRequest], tokenizer: Any,
                    timeout_s: float) -> tuple[list[Answer], float]:
    """Send every request at once; returns the answers (in order) and the wall time."""
    from common.client import AsyncClient

    async with AsyncClient(endpoint, default_timeout_s=timeout_s) as client:
        started = time.monotonic()
        answers = await asyncio.gather(*(_one(client, r, tokenizer) for r in requests))
        return list(answers), time.monotonic() - started


async def _one(client: Any, request: DemoRequest, tokenizer: Any) -> Answer:
    from common.errors import ExegptError

    sent = time.time()
    try:
        result = await client.generate(prompt_ids=request.prompt_ids,
                                       max_new_tokens=request.max_new_tokens,
                                       stop_token_ids=request.stop_token_ids)
    except ExegptError as exc:
        return Answer(request, "", 0, time.time() - sent, None, f"{type(exc).__name__}: {exc}")
    life = result.lifecycle
    latency = (life.t_finish - life.t_arrival
               if life.t_finish is not None and life.t_arrival is not None
               else time.time() - sent)
    text = result.text if result.text is not None else _decode(tokenizer, result.tokens)
    return Answer(request, text, len(result.tokens), latency, life.ttft)


def _decode(tokenizer: Any, tokens: Sequence[int]) -> str:
    if tokenizer is None:
        return " ".join(str(t) for t in tokens)
    return str(tokenizer.decode(tokens)).strip()


def render(outcome: DemoOutcome, *, width: int = 100) -> str:
    lines = []
    for a in outcome.answers:
        tag = "p99-length probe" if a.request.probe else "answer"
        body = a.error or " ".join(a.text.split())
        if len(body) > width:
            body = body[:width - 3] + "..."
        lines.append(f"Q: {a.request.question}\n   {tag} ({a.num_tokens} tokens, "
                     f"{a.latency_s:.2f} s): {body}")
    pr = outcome.predicted
    lines.append("")
    lines.append(f"throughput   {outcome.throughput_seq_s:.2f} seq/s, "
                 f"{outcome.throughput_tok_s:.1f} tok/s over {outcome.wall_s:.1f} s "
                 f"({len(outcome.ok)} ok, {len(outcome.failed)} failed); plan predicted "
                 f"{pr.get('throughput_seq_s', float('nan')):.2f} seq/s "
                 f"{pr.get('throughput_tok_s', float('nan')):.1f} tok/s at saturation")
    lat = outcome.p99_length_latency_s
    verdict = ("no probe finished" if lat is None else
               "within the bound" if outcome.within_bound else "OVER the bound")
    shown = "-" if lat is None else f"{lat:.2f} s"
    lines.append(f"latency      p99-length request {shown} vs bound {outcome.bound_s:g} s: "
                 f"{verdict} (predicted {pr.get('latency_p99len_s', float('nan')):.2f} s)")
    return "\n".join(lines)


def run_demo(args: Any, plan: Any, argv: list[str], endpoint: str, tokenizer: Any,
             vocab_size: int) -> int:
    """`up --demo` after planning: start serve, send the batch, print, stop; the exit code."""
    import sys

    from coordinator.commands._mesh_proc import ServeProcess

    info = plan.workload_info
    num = args.demo_requests or min(64, max(8, plan.B_E * plan.microbatches))
    requests = build_requests(
        tokenizer, num_requests=num, num_probes=min(args.demo_probes, num),
        p99_output=int(info.get("p99_output") or 64),
        max_output=int(info.get("p99_output") or 64), vocab_size=vocab_size)
    mesh = ServeProcess(argv, endpoint)
    try:
        mesh.start(args.startup_timeout + 30.0)
    except RuntimeError as exc:
        print(f"exegpt up: {exc}", file=sys.stderr)
        return 1
    try:
        probes = sum(r.probe for r in requests)
        print(f"exegpt up: demo: {len(requests)} requests at once ({probes} p99-length probes)")
        timeout_s = max(60.0, 4 * plan.latency_bound_s)
        answers, wall = asyncio.run(run_batch(endpoint, requests, tokenizer, timeout_s))
        outcome = DemoOutcome(tuple(answers), wall, plan.latency_bound_s, plan.predicted)
        print(render(outcome), flush=True)
        _print_stats(endpoint, plan)
        alive = mesh.alive()
    finally:
        code = mesh.stop()
    if outcome.failed or not alive:
        print(f"exegpt up: demo failed ({len(outcome.failed)} failed requests, mesh "
              f"{'alive' if alive else 'died'}, serve exit {code})", file=sys.stderr)
        return 1
    return 0


def _print_stats(endpoint: str, plan: Any) -> None:
    from coordinator.commands._stats_view import fetch_stats, render_text, summarize

    try:
        msg = fetch_stats(endpoint, timeout_s=10.0)
    except Exception as exc:  # noqa: BLE001 - stats are informative; the demo verdict stands
        print(f"exegpt up: (stats unavailable: {exc})", flush=True)
        return
    print(render_text(summarize(msg, plan.to_dict())), flush=True)
