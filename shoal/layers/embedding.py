"""Token embedding and the output head (optionally tied to the embedding)."""

from __future__ import annotations

import torch
from torch import nn

from shoal.backends.ops import REFERENCE, Ops


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(token_ids, self.weight)


class LMHead(nn.Module):
    """hidden -> vocabulary logits. With `tied_to`, it reads the embedding matrix instead of its own.
    `prepared` as in Linear."""

    ops: Ops = REFERENCE  # the backend's, once the model is built
    prepared = None

    def __init__(self, vocab_size: int, hidden_size: int, tied_to: VocabEmbedding | None = None) -> None:
        super().__init__()
        self.tied_to = tied_to
        if tied_to is None:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.tied_to.weight if self.tied_to is not None else self.weight
        return self.ops.linear(hidden, weight, prepared=self.prepared)
