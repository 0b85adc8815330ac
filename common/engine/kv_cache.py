"""Per-sequence KV storage for one stage (its layer range and its TP slice of the KV heads).

Layout: one preallocated buffer per tensor name, ``[num_layers, slots, heads, capacity, head_dim]``.
A sequence (``req_id``) owns one slot. Decode appends one position per step in place (no
concatenation); attention reads ``buf[layer, s0:s1, :, :L]`` as a view when the batch occupies
consecutive slots, which ``compact()`` restores after ``free()`` leaves holes. Buffers grow
(rarely, by doubling) when a sequence outgrows the capacity or more slots are needed.

Names: ``"k"``/``"v"`` are the self-attention cache that grows by one per decode step; names
passed as ``fixed_names`` (T5: ``"cross_k"``/``"cross_v"``) hold a per-sequence fixed length
(the encoder input) with their own length counter.

Export/import move one sequence's KV for a layer range and a KV-head range as plain contiguous
tensors (``KVExport``): the encoder -> decoder handoff, and re-sharding between tp sizes (the
receiver imports every export overlapping its own heads).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

SELF = "self"
FIXED = "fixed"


@dataclass(frozen=True)
class KVExport:
    """One sequence's KV: tensors[name] is contiguous [num_layers, num_heads_in_range, len, D]."""

    req_id: str
    seq_len: int
    layer_start: int
    layer_end: int
    head_start: int
    head_end: int
    num_kv_heads: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (0 <= self.layer_start <= self.layer_end and
                0 <= self.head_start < self.head_end <= self.num_kv_heads):
            raise ValueError(f"bad KVExport ranges: layers [{self.layer_start}, "
                             f"{self.layer_end}), heads [{self.head_start}, {self.head_end}) "
                             f"of {self.num_kv_heads}")
        for name, t in self.tensors.items():
            want = (self.layer_end - self.layer_start, self.head_end - self.head_start)
            if tuple(t.shape[:2]) != want:
                raise ValueError(f"KVExport tensor {name!r} has shape {tuple(t.shape)}, "
                                 f"expected leading dims {want}")


@dataclass(frozen=True)
class CacheBatch:
    """Slots of a batch and their lengths before this step; ``span`` is set when consecutive,
    ``uniform`` when also every sequence has length ``max_len`` (the cheap decode path: plain
    slice writes and no length mask)."""

    slots: torch.Tensor
    lengths: torch.Tensor
    max_len: int
    span: tuple[int, int] | None
    uniform: bool = False


class KVCache:
    """Slot-based cache of one stage; see the module docstring for the layout.

    The buffers are never part of autograd: every method that allocates or writes them runs in
    inference mode, so workers may manage the cache between steps outside the stages' own
    inference mode (torch refuses in-place updates of inference tensors there otherwise).
    """

    def __init__(self, *, layer_start: int, layer_end: int, head_start: int, head_end: int,
                 num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", names: Sequence[str] = ("k", "v"),
                 fixed_names: Sequence[str] = (), max_slots: int = 8,
                 len_step: int = 128, transposed_names: Sequence[str] = ("k",)) -> None:
        self.layer_start, self.layer_end = layer_start, layer_end
        self.head_start, self.head_end = head_start, head_end
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.len_step = len_step
        self.group_of = {n: SELF for n in names} | {n: FIXED for n in fixed_names}
        self.transposed = set(transposed_names) & set(self.group_of)
        self._slot_of: dict[str, int] = {}
        self._req_of: list[str | None] = [None] * max_slots
        self._lengths = {SELF: [0] * max_slots, FIXED: [0] * max_slots}
        self._bufs = {n: self._alloc(n, max_slots, len_step) for n in self.group_of}

    # ---- bookkeeping -------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start

    @property
    def num_heads(self) -> int:
        return self.head_end - self.head_start

    @torch.inference_mode()
    def _alloc(self, name: str, slots: int, capacity: int) -> torch.Tensor:
        """A logical [layers, slots, heads, capacity, D] buffer. Keys are stored as
        [..., D, capacity] (a transposed view): the decode QK^T matmul then reads rows of
        unit stride, about twice as fast in bf16 as the sliced [L, D] layout."""
        if name in self.transposed:
            return torch.zeros(self.num_layers, slots, self.num_heads, self.head_dim, capacity,
                               dtype=self.dtype, device=self.device).transpose(-1, -2)
        return torch.zeros(self.num_layers, slots, self.num_heads, capacity, self.head_dim,
                           dtype=self.dtype, device=self.device)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._slot_of

    def __len__(self) -> int:
        return len(self._slot_of)

    def order(self) -> list[str]:
        """Active req_ids in slot order (after ``compact()``, a batch of consecutive slots)."""
        return [r for r in self._req_of if r is not None]

    def seq_len(self, req_id: str, group: str = SELF) -> int:
        return self._lengths[group][self.slot(req_id)]

    def slot(self, req_id: str) -> int:
        if req_id not in self._slot_of:
            raise KeyError(f"request {req_id!r} has no KV in this cache")
        return self._slot_of[req_id]

    def add(self, req_id: str) -> int:
        """Give ``req_id`` the lowest free slot (growing the slot count when full)."""
        if req_id in self._slot_of:
            raise ValueError(f"request {req_id!r} is already in the KV cache")
        if None not in self._req_of:
            self._grow_slots(2 * len(self._req_of))
        slot = self._req_of.index(None)
        self._req_of[slot] = req_id
        self._slot_of[req_id] = slot
        for lengths in self._lengths.values():
            lengths[slot] = 0
        return slot

    def free(self, req_id: str) -> None:
        """Release a finished sequence at once; its slot is reused by the next ``add``."""
        slot = self._slot_of.pop(req_id)
        self._req_of[slot] = None
        for lengths in self._lengths.values():
            lengths[slot] = 0

    @torch.inference_mode()
    def compact(self) -> None:
        """Move the highest-slot sequences into holes so the active ones occupy slots 0..n-1."""
        while True:
            holes = [i for i, r in enumerate(self._req_of[: len(self)]) if r is None]
            if not holes:
                return
            src = max(self._slot_of.values())
            self._move(src, holes[0])

    def _move(self, src: int, dst: int) -> None:
        for buf in self._bufs.values():
            buf[:, dst].copy_(buf[:, src])
        req_id = self._req_of[src]
        assert req_id is not None
        self._req_of[dst], self._req_of[src] = req_id, None
        self._slot_of[req_id] = dst
        for lengths in self._lengths.values():
            lengths[dst], lengths[src] = lengths[src], 0

    # ---- capacity ----------------------------------------------------------------------
    @torch.inference_mode()
    def _grow_slots(self, slots: int) -> None:
        extra = slots - len(self._req_of)
        self._req_of.extend([None] * extra)
        for lengths in self._lengths.values():
            lengths.extend([0] * extra)
        for name, buf in self._bufs.items():
            new = self._alloc(name, slots, buf.shape[3])
            new[:, : buf.shape[1]].copy_(buf)
            self._bufs[name] = new

    @torch.inference_mode()
    def reserve(self, group: str, length: int) -> None:
        """Make every buffer of ``group`` hold at least ``length`` positions."""
        for name, buf in self._bufs.items():
            if self.group_of[name] != group or buf.shape[3] >= length:
                continue
            capacity = max(2 * buf.shape[3], -(-length // self.len_step) * self.len_step)
            new = self._alloc(name, buf.shape[1], capacity)
            new[..., : buf.shape[3], :].copy_(buf)
            self._bufs[name] = new

    # ---- model-facing reads and writes -------------------------------------------------
    def batch(self, req_ids: Sequence[str], group: str = SELF) -> CacheBatch:
        slots = [self.slot(r) for r in req_ids]
        if not slots:
            raise ValueError("a KV cache batch needs at least one request")
        lengths = [self._lengths[group][s] for s in slots]
        if group == SELF:
            self.reserve(SELF, max(lengths) + 1)  # room for this step's append
        span = None
        if slots == list(range(slots[0], slots[0] + len(slots))):
            span = (slots[0], slots[0] + len(slots))
        longest = max(lengths)
        return CacheBatch(slots=torch.tensor(slots, device=self.device),
                          lengths=torch.tensor(lengths, device=self.device),
                          max_len=longest, span=span,
                          uniform=span is not None and min(lengths) == longest)

    @torch.inference_mode()
    def write(self, layer: int, name: str, slot: int, start: int, values: torch.Tensor) -> None:
        """Store ``values`` [heads, T, D] at positions [start, start+T) of one sequence."""
        end = start + values.shape[1]
        self.reserve(self.group_of[name], end)
        self._bufs[name][layer - self.layer_start, slot, :, start:end].copy_(values)

    @torch.inference_mode()
    def append(self, layer: int, name: str, batch: CacheBatch, values: torch.Tensor) -> None:
        """Store one position per sequence (``values`` [B, heads, D]) at its current length."""
        buf = self._bufs[name][layer - self.layer_start]
        if batch.uniform and batch.span is not None:
            buf[batch.span[0]: batch.span[1], :, batch.max_len].copy_(values)
        else:
            buf[batch.slots, :, batch.lengths] = values

    def view(self, layer: int, name: str, batch: CacheBatch, length: int) -> torch.Tensor:
        """[B, heads, length, D]; a zero-copy view when the batch's slots are consecutive."""
        buf = self._bufs[name][layer - self.layer_start]
        if batch.span is not None:
            return buf[batch.span[0]: batch.span[1], :, :length]
        return buf[batch.slots, :, :length]

    def layer_buffer(self, layer: int, name: str) -> torch.Tensor:
        """The whole [slots, heads, capacity, D] buffer of one layer (kernels index it by slot)."""
        return self._bufs[name][layer - self.layer_start]

    def prefix(self, layer: int, name: str, slot: int, end: int) -> torch.Tensor:
        """[heads, end, D] view of positions [0, end) of one slot (prefill reads its keys)."""
        return self._bufs[name][layer - self.layer_start, slot, :, :end]

    def sequence(self, layer: int, name: str, req_id: str) -> torch.Tensor:
        """[heads, len, D] view of one sequence's stored positions."""
        slot = self.slot(req_id)
        length = self._lengths[self.group_of[name]][slot]
        return self._bufs[name][layer - self.layer_start, slot, :, :length]

    def set_length(self, req_id: str, length: int, group: str = SELF) -> None:
        self.reserve(group, length)
        self._lengths[group][self.slot(req_id)] = length

    def advance(self, req_ids: Sequence[str], steps: int = 1) -> None:
        """Count ``steps`` new positions for each sequence (after every layer has written)."""
        for r in req_ids:
            self._lengths[SELF][self.slot(r)] += steps
        longest = max(self._lengths[SELF][self.slot(r)] for r in req_ids)
        self.reserve(SELF, longest + 1)

    # ---- export / import ---------------------------------------------------------------
    def export(self, req_id: str, layers: tuple[int, int] | None = None,
               kv_heads: tuple[int, int] | None = None) -> KVExport:
        """Copy one sequence's KV (global layer and KV-head ranges, default: all held here)."""
        l0, l1 = layers or (self.layer_start, self.layer_end)
        h0, h1 = kv_heads or (self.head_start, self.head_end)
        if not (self.layer_start <= l0 <= l1 <= self.layer_end
                and self.head_start <= h0 < h1 <= self.head_end):
            raise ValueError(f"export range layers [{l0}, {l1}) heads [{h0}, {h1}) is not held "
                             f"here (layers [{self.layer_start}, {self.layer_end}), heads "
                             f"[{self.head_start}, {self.head_end}))")
        slot = self.slot(req_id)
        tensors = {}
        for name, buf in self._bufs.items():
            length = self._lengths[self.group_of[name]][slot]
            part = buf[l0 - self.layer_start: l1 - self.layer_start, slot,
                       h0 - self.head_start: h1 - self.head_start, :length]
            tensors[name] = part.contiguous()
        return KVExport(req_id=req_id, seq_len=self._lengths[SELF][slot], layer_start=l0,
                        layer_end=l1, head_start=h0, head_end=h1,
                        num_kv_heads=self.num_kv_heads, tensors=tensors)

    @torch.inference_mode()
    def import_(self, exp: KVExport) -> None:
        """Take the part of ``exp`` overlapping this cache's layers and heads (a receiver with
        another tp_size imports several exports, or a slice of one)."""
        if exp.num_kv_heads != self.num_kv_heads:
            raise ValueError(f"KV export has {exp.num_kv_heads} KV heads, cache expects "
                             f"{self.num_kv_heads}")
        l0, l1 = max(exp.layer_start, self.layer_start), min(exp.layer_end, self.layer_end)
        h0, h1 = max(exp.head_start, self.head_start), min(exp.head_end, self.head_end)
        if l0 >= l1 or h0 >= h1:
            return
        if exp.req_id not in self:
            self.add(exp.req_id)
        slot = self.slot(exp.req_id)
        for name, t in exp.tensors.items():
            if name not in self._bufs:
                raise ValueError(f"KV export tensor {name!r} unknown to this cache")
            group = self.group_of[name]
            self.reserve(group, t.shape[2] + (1 if group == SELF else 0))
            self._lengths[group][slot] = t.shape[2]
            src = t[l0 - exp.layer_start: l1 - exp.layer_start,
                    h0 - exp.head_start: h1 - exp.head_start]
            self._bufs[name][l0 - self.layer_start: l1 - self.layer_start, slot,
                             h0 - self.head_start: h1 - self.head_start, : t.shape[2]].copy_(src)
