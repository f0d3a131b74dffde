"""The logits processor that applies a `JsonArrayConstraint` during generation, row by row."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, cast

import torch
from transformers import LogitsProcessor

from discover_agent.json_grammar import END, State

if TYPE_CHECKING:
    from discover_agent.constrained import JsonArrayConstraint

__all__ = ["ConstraintProcessor", "row_index"]


class ConstraintProcessor(LogitsProcessor):
    """Masks each row's logits to what the grammar allows after the tokens that row generated so far.

    Rows are followed incrementally (one token per call); a new batch, or a shorter one, starts over. A row
    that has emitted EOS is finished: `generate` pads it, and the padding is not read.
    """

    def __init__(self, constraint: JsonArrayConstraint, prompt_length: int) -> None:
        if prompt_length < 0:
            raise ValueError(f"prompt_length must be >= 0, got {prompt_length}")
        self.constraint = constraint
        self.prompt_length = prompt_length
        self.states: list[State] = []
        self.seen = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        allowed = self.allowed_ids(input_ids)
        rows, cols = row_index(allowed).to(scores.device), torch.cat(allowed).to(scores.device)
        masked = torch.full_like(scores, -math.inf)
        masked[rows, cols] = scores[rows, cols]
        return cast(torch.FloatTensor, masked)  # transformers annotates the legacy tensor type

    def allowed_ids(self, input_ids: torch.LongTensor) -> list[torch.Tensor]:
        """Ids of the tokens each row may take next, after the tokens it generated so far: what `__call__`
        masks to, for callers that compute only those logits."""
        generated = input_ids.shape[1] - self.prompt_length
        if generated < 0:
            raise ValueError(f"input has {input_ids.shape[1]} tokens, fewer than prompt_length {self.prompt_length}")
        if len(self.states) != input_ids.shape[0] or generated < self.seen:
            self.states = [self.constraint.start] * input_ids.shape[0]
            self.seen = 0
        if generated > self.seen:
            new = input_ids[:, self.prompt_length + self.seen :].tolist()
            for row, tokens in enumerate(new):
                for token_id in tokens:
                    state = self.states[row]
                    if state.phase == END:
                        break
                    after = self.constraint.advance(state, token_id)
                    if after is None:
                        raise ValueError(f"row {row} generated token {token_id}, which the grammar forbids")
                    self.states[row] = after
            self.seen = generated
        return [self.constraint.allowed_ids(state) for state in self.states]


def row_index(ids: list[torch.Tensor]) -> torch.Tensor:
    """Row number of every entry of `torch.cat(ids)`."""
    return torch.cat([torch.full((len(row),), i, dtype=torch.long) for i, row in enumerate(ids)])
