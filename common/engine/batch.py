"""The value a stage's ``encode``/``decode`` takes: a ragged batch, flat over tokens.

Sequences are packed back to back (no padding): ``input_ids`` (first stage) or ``hidden`` (later
stages, the previous stage's output) has ``sum(seq_lens)`` rows. Decode batches have
``seq_lens == [1] * num_seqs``. ``extra`` carries family-specific inputs (T5: decoder ids).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class StageBatch:
    req_ids: list[str]
    seq_lens: list[int]
    input_ids: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.req_ids) != len(self.seq_lens) or not self.req_ids:
            raise ValueError("StageBatch needs one seq_len per req_id and at least one request")
        if len(set(self.req_ids)) != len(self.req_ids):
            raise ValueError("StageBatch req_ids must be unique")
        if min(self.seq_lens) < 1:
            raise ValueError("every sequence in a StageBatch needs at least one token")
        if (self.input_ids is None) == (self.hidden is None):
            raise ValueError("StageBatch takes exactly one of input_ids (first stage) or hidden")
        rows = (self.input_ids if self.input_ids is not None else self.hidden).shape[0]
        if rows != self.num_tokens:
            raise ValueError(f"StageBatch has {rows} rows for {self.num_tokens} tokens")

    @property
    def num_seqs(self) -> int:
        return len(self.req_ids)

    @property
    def num_tokens(self) -> int:
        return sum(self.seq_lens)

    @staticmethod
    def from_prompts(req_ids: list[str], prompts: list[list[int]],
                     device: torch.device | str = "cpu") -> StageBatch:
        flat = [t for p in prompts for t in p]
        return StageBatch(req_ids=list(req_ids), seq_lens=[len(p) for p in prompts],
                          input_ids=torch.tensor(flat, dtype=torch.long, device=device))

    @staticmethod
    def from_tokens(req_ids: list[str], tokens: list[int],
                    device: torch.device | str = "cpu") -> StageBatch:
        return StageBatch(req_ids=list(req_ids), seq_lens=[1] * len(tokens),
                          input_ids=torch.tensor(tokens, dtype=torch.long, device=device))

    def with_hidden(self, hidden: torch.Tensor) -> StageBatch:
        """The same sequences carrying the previous stage's output."""
        return StageBatch(req_ids=self.req_ids, seq_lens=self.seq_lens, hidden=hidden,
                          extra=self.extra)
