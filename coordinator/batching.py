"""Forming encode batches and placing requests on workers (pure functions, no I/O).

A batch is formed only when an encoder can take it (fewer than ``max_outstanding`` batches in
flight there) and only from requests a decoder has room for: admission control is the
decoders' free slots, so a flood of requests waits in the coordinator's queue instead of
piling KV onto a decoder that cannot run it. Requests leave the queue in arrival order.
"""

from __future__ import annotations

import heapq

from coordinator.registry import WorkerInfo
from coordinator.requests import Request


def pick_encoder(encoders: list[WorkerInfo], max_outstanding: int) -> WorkerInfo | None:
    """The encoder with the fewest batches in flight, if any has room for one more."""
    free = [e for e in encoders if e.outstanding_batches < max_outstanding]
    if not free:
        return None
    return min(free, key=lambda e: (e.outstanding_batches, e.num_active, e.worker_id))


def place_batch(queued: list[Request], decoders: list[WorkerInfo], max_batch: int,
                ) -> list[tuple[Request, WorkerInfo]]:
    """Take up to ``max_batch`` queued requests, each onto the least-loaded decoder with room.

    Stops at the first request no decoder can take, so arrival order is kept.
    """
    heap = [(d.num_active - d.capacity, d.num_active, i) for i, d in enumerate(decoders)
            if d.free_slots > 0]
    heapq.heapify(heap)
    extra = [0] * len(decoders)
    placed: list[tuple[Request, WorkerInfo]] = []
    for request in queued[:max_batch]:
        if not heap:
            break
        _, _, i = heapq.heappop(heap)
        placed.append((request, decoders[i]))
        extra[i] += 1
        load = decoders[i].num_active + extra[i]
        if load < decoders[i].capacity:
            heapq.heappush(heap, (load - decoders[i].capacity, load, i))
    return placed
