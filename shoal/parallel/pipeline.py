"""One step on one rank: the shard of the forward this rank holds — the embedding on the first
pipeline stage, this stage's decoder layers, the final norm and vocabulary head on the last — with
hidden states received from the previous stage and sent on to the next.

Sends are asynchronous (isend): a stage hands its activations on and starts the next micro-batch
while they travel; the handle is waited on before the next send, which keeps at most one outstanding
per peer. Every model family follows CausalLM.forward's shape (embed -> layers -> norm under
`model.model`), so this needs nothing family-specific.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from shoal.models.base import CausalLM
from shoal.parallel.layers import COLLECTIVE_BYTES
from shoal.parallel.state import ParallelState

TAG_HIDDEN, TAG_LOGITS = 11, 12


class StageSender:
    """Outstanding asynchronous sends of this rank (their tensors must live until done)."""

    def __init__(self) -> None:
        self.pending: list = []

    def send(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        self.flush()
        tensor = tensor.contiguous()
        self.pending.append((dist.isend(tensor, dst, tag=tag), tensor))
        COLLECTIVE_BYTES["pipeline send"] += tensor.numel() * tensor.element_size()

    def flush(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()


def run_stage(model: CausalLM, state: ParallelState, cache, token_ids: torch.Tensor, positions: torch.Tensor,
              last_rows: torch.Tensor, sender: StageSender) -> torch.Tensor | None:
    """token_ids / positions [1, T]; returns float32 logits of `last_rows` on the last stage, else None
    (the hidden states went to the next stage)."""
    cache.begin_forward(positions, model.sliding_window)
    if state.is_first_stage:
        x = model.model.embed_tokens(token_ids)
    else:
        x = torch.empty(1, token_ids.shape[1], model.config.hidden_size, dtype=torch.get_default_dtype(),
                        device=token_ids.device)
        dist.recv(x, state.stage_rank(state.stage - 1), tag=TAG_HIDDEN)
    first, end = state.layer_range()
    for index in range(first, end):
        x = model.model.layers[index](x, positions, cache)
    if not state.is_last_stage:
        sender.send(x, state.stage_rank(state.stage + 1), TAG_HIDDEN)
        return None
    x = model.model.norm(x)[0]
    if last_rows.numel() == 0:
        return None
    return model.compute_logits(x.index_select(0, last_rows))
