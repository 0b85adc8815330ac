"""The coordinator's view of one request, and the table of requests in flight.

Request state machine (the coordinator owns it; workers only ever see a request's data)::

                 admit                 encode batch sent            first token streamed
    (Submit) ----------> QUEUED --------------------------> ENCODING -----------------> DECODING
                           |   (encoder + decoder chosen)       |                          |
                           |                                    |                  last token
                           |                                    |                          v
                           +---- cancel / deadline / worker lost / shutdown ------------> DONE
                           ^     (answered with an Error, or Cancelled)        (Result sent)
                           |                                    |                          |
                           +------ worker lost, another of its role remains: re-run -------+
                                   (decoder-only: prompt + tokens streamed so far, the rest of
                                   the output; encoder-decoder: the prompt again, replayed)

A re-run of an encoder-decoder (T5) request cannot append the streamed tokens to the prompt:
they are decoder-side tokens, and the encoder would read them as input. It runs again from
the prompt alone and *replays*: its first k tokens (k = what the client already has) are
checked against the streamed ones and dropped, then the stream continues at index k. Greedy
decoding regenerates the same tokens, and so does seeded sampling (each draw is seeded by
(seed, output position), common/engine/sampling.py; an unseeded sampled request of such a
model gets its seed here at admission). A regenerated token that differs fails the request
(:class:`ReplayMismatch`): never a discontinuous stream.

Every transition stamps a lifecycle time (``time.time()`` clock): arrival and queued at admit,
encode start/end and KV sent from the encoder (relayed by the decoder), KV received, first
token, one stamp per token, finish. A request is answered exactly once: :meth:`Request.finish`
and :meth:`Request.fail` move it to DONE and the table forgets it.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from common.protocol import Lifecycle, Sampling


class ReplayMismatch(Exception):
    """A replaying re-run regenerated a token other than the one the client already has."""

    def __init__(self, req_id: str, index: int, streamed: int, regenerated: int) -> None:
        super().__init__(
            f"the re-run of request {req_id} from its prompt regenerated token {regenerated} at "
            f"output index {index}, where the client already has {streamed}; the stream "
            "cannot continue without a discontinuity")
        self.index, self.streamed, self.regenerated = index, streamed, regenerated


class State(enum.Enum):
    QUEUED = "queued"
    ENCODING = "encoding"
    DECODING = "decoding"
    DONE = "done"


TIMESTAMP_FIELDS = ("t_arrival", "t_queued", "t_encode_start", "t_encode_end", "t_kv_sent",
                    "t_kv_received", "t_first_token", "t_finish")


@dataclass
class Timestamps:
    """Lifecycle times of one request; ``None`` until reached."""

    t_arrival: float | None = None
    t_queued: float | None = None
    t_encode_start: float | None = None
    t_encode_end: float | None = None
    t_kv_sent: float | None = None
    t_kv_received: float | None = None
    t_first_token: float | None = None
    t_tokens: list[float] = field(default_factory=list)
    t_finish: float | None = None

    def update(self, stamps: dict[str, float | None]) -> None:
        """Take stamps measured elsewhere (encoder, decoder); never overwrite a known one."""
        for name in TIMESTAMP_FIELDS:
            value = stamps.get(name)
            if value is not None and getattr(self, name) is None:
                setattr(self, name, float(value))

    def take(self, lifecycle: Lifecycle | None) -> None:
        if lifecycle is not None:
            self.update({name: getattr(lifecycle, name) for name in TIMESTAMP_FIELDS})

    def lifecycle(self) -> Lifecycle:
        stamps = {name: getattr(self, name) for name in TIMESTAMP_FIELDS}
        return Lifecycle(t_tokens=tuple(self.t_tokens), **stamps)


@dataclass
class Request:
    """One admitted request: who asked (client routing id), what, and where it runs."""

    req_id: str
    client: bytes
    prompt: tuple[int, ...]
    max_new_tokens: int
    sampling: Sampling
    stream: bool
    deadline: float | None  # absolute time.time(); None: no deadline
    state: State = State.QUEUED
    encoder: str | None = None
    decoder: str | None = None
    tokens: list[int] = field(default_factory=list)
    times: Timestamps = field(default_factory=Timestamps)
    text_prompt: bool = False  # submitted as text: the Result carries the output as text
    attempt: int = 0  # re-runs after a worker loss (0: the first run)
    encode_sent_at: float | None = None  # time.time() its encode batch left (KV wait timeout)
    run_start: int = 0  # output index of the current run's first token (0: replays or first)
    run_seen: int = 0  # tokens the current run has produced (replayed ones included)

    @property
    def wire_id(self) -> str:
        """The id workers know this run by. A re-run gets a new one, so whatever the old run
        left behind (late tokens, errors, an encoder's cancel tombstone) cannot touch it."""
        if self.attempt == 0:
            return self.req_id
        stem = self.req_id if len(self.req_id) <= 240 else hashlib.sha1(
            self.req_id.encode()).hexdigest()
        return f"{stem}~rerun{self.attempt}"

    def rerun_input(self) -> tuple[tuple[int, ...], int, int]:
        """(prompt ids, max new tokens, output offset) of the current run: the prompt plus the
        tokens it continues from (none when it replays), and the tokens still owed."""
        done = self.run_start
        return self.prompt + tuple(self.tokens[:done]), self.max_new_tokens - done, done

    def new_run(self, replay: bool) -> None:
        """Back to the queue for another run: it continues after the streamed tokens, or
        (``replay``, an encoder-decoder model) regenerates them first (module docstring)."""
        self.state, self.encoder, self.decoder = State.QUEUED, None, None
        self.run_start, self.run_seen = (0 if replay else len(self.tokens)), 0

    @property
    def last_token(self) -> int | None:
        """The current run's latest token (its next decode step's input); None before the
        run's first token."""
        return self.tokens[self.run_start + self.run_seen - 1] if self.run_seen else None

    @property
    def replaying(self) -> int:
        """Tokens the current run must still regenerate before it produces new ones."""
        return max(0, len(self.tokens) - self.run_start - self.run_seen)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt)

    def start_encode(self, encoder: str, decoder: str) -> None:
        self._expect(State.QUEUED)
        self.state, self.encoder, self.decoder = State.ENCODING, encoder, decoder
        self.encode_sent_at = time.time()

    def add_tokens(self, tokens: tuple[int, ...], now: float) -> int:
        """Append a decoder's new tokens (in order: one decoder, one ordered pipe); returns
        the output position of the first new one (the StreamChunk index). A replaying run's
        tokens the client already has are checked and dropped (ReplayMismatch if one differs);
        ``self.tokens[start:]`` are the new ones."""
        position = self.run_start + self.run_seen
        known = min(len(tokens), self.replaying)
        for i in range(known):
            if tokens[i] != self.tokens[position + i]:
                raise ReplayMismatch(self.req_id, position + i, self.tokens[position + i],
                                     tokens[i])
        self.run_seen += len(tokens)
        fresh = tokens[known:]
        start = len(self.tokens)
        if fresh and self.times.t_first_token is None:
            self.times.t_first_token = now
        self.state = State.DECODING
        self.tokens.extend(fresh)
        self.times.t_tokens.extend([now] * len(fresh))
        return start

    @property
    def complete(self) -> bool:
        return len(self.tokens) >= self.max_new_tokens

    def close(self, now: float) -> None:
        self.state = State.DONE
        self.times.t_finish = now

    def _expect(self, state: State) -> None:
        if self.state is not state:
            raise ValueError(f"request {self.req_id} is {self.state.value}, expected {state.value}")


class RequestTable:
    """Requests in flight by req_id, plus the FIFO of those waiting for an encoder.

    ``encoder_decoder`` (the served model is T5-like): re-runs replay from the prompt, and a
    sampled request without a seed gets one at admission so that its replay draws the same."""

    def __init__(self, encoder_decoder: bool = False) -> None:
        self.encoder_decoder = encoder_decoder
        self._by_id: dict[str, Request] = {}
        self._queue: dict[str, None] = {}  # insertion-ordered set of QUEUED req_ids
        self._per_client: Counter[bytes] = Counter()  # requests in flight per client
        self._wire: dict[str, str] = {}  # wire_id -> req_id of re-runs (attempt > 0)

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._by_id

    def __iter__(self) -> Iterator[Request]:
        return iter(list(self._by_id.values()))

    def get(self, req_id: str) -> Request | None:
        return self._by_id.get(req_id)

    def admit(self, request: Request) -> None:
        if request.req_id in self._by_id:
            raise ValueError(f"request id {request.req_id!r} is already in flight; use a new id")
        now = time.time()
        sampling = request.sampling
        if self.encoder_decoder and sampling.temperature > 0 and sampling.seed is None:
            request.sampling = dataclasses.replace(sampling, seed=secrets.randbits(63))
        request.times.t_queued = now
        if request.times.t_arrival is None:
            request.times.t_arrival = now
        self._by_id[request.req_id] = request
        self._queue[request.req_id] = None
        self._per_client[request.client] += 1

    def num_for(self, client: bytes) -> int:
        """Requests in flight for one client (the per-client admission limit)."""
        return self._per_client.get(client, 0)

    @property
    def num_queued(self) -> int:
        return len(self._queue)

    def peek_queued(self, limit: int) -> list[Request]:
        out = []
        for req_id in self._queue:
            if len(out) >= limit:
                break
            out.append(self._by_id[req_id])
        return out

    def get_wire(self, wire_id: str) -> Request | None:
        """The request a worker's message is about, only if it names the current run."""
        request = self._by_id.get(self._wire.get(wire_id, wire_id))
        return request if request is not None and request.wire_id == wire_id else None

    def requeue(self, request: Request) -> None:
        """Put a request whose worker was lost back at the head of the queue, as a new run."""
        self._wire.pop(request.wire_id, None)
        request.new_run(self.encoder_decoder)
        request.attempt += 1
        self._wire[request.wire_id] = request.req_id
        self._queue = {request.req_id: None, **self._queue}

    def requeue_front(self, request: Request) -> None:
        """A request migrated by a pipeline re-layout (coordinator.relayout): back to the head
        of the queue in the same run (the old layout's stages no longer exist, so its id
        cannot meet a stale message); re-encoded from ``rerun_input``."""
        request.new_run(self.encoder_decoder)
        self._queue = {request.req_id: None, **self._queue}

    def dequeue(self, request: Request) -> None:
        self._queue.pop(request.req_id, None)

    def remove(self, req_id: str) -> Request | None:
        self._queue.pop(req_id, None)
        request = self._by_id.pop(req_id, None)
        if request is not None:
            self._wire.pop(request.wire_id, None)
            left = self._per_client[request.client] - 1
            if left > 0:
                self._per_client[request.client] = left
            else:
                del self._per_client[request.client]
        return request

    def held_by(self, worker: str) -> list[Request]:
        """Requests a lost worker takes down: all on a decoder, those not yet past an encoder."""
        return [r for r in self._by_id.values() if r.decoder == worker
                or (r.encoder == worker and r.state is State.ENCODING)]

    def kv_overdue(self, now: float, limit_s: float) -> list[Request]:
        """Requests still waiting for their first token ``limit_s`` after their encode batch
        left: the KV handoff (or the encode) was lost on the way."""
        return [r for r in self._by_id.values() if r.state is State.ENCODING
                and r.encode_sent_at is not None and now - r.encode_sent_at > limit_s]

    def expired(self, now: float) -> list[Request]:
        return [r for r in self._by_id.values() if r.deadline is not None and now > r.deadline]
