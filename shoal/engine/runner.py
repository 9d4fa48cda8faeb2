"""ModelRunner: runs one engine step — one forward over every scheduled chunk, padded into a batch —
and samples the next token of each sequence whose chunk reached its end."""

from __future__ import annotations

import torch

from shoal.engine.scheduler import ScheduledChunk
from shoal.layers.paged_kv_cache import PagedKVCache
from shoal.layers.sampler import sample_batch
from shoal.models.base import CausalLM
from shoal.outputs import TokenLogprob


class ModelRunner:
    def __init__(self, model: CausalLM, cache: PagedKVCache, device: torch.device) -> None:
        self.model, self.cache, self.device = model, cache, device

    def _slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        size = self.cache.block_size
        return [block_table[p // size] * size + p % size for p in range(start, end)]

    def step(self, chunks: list[ScheduledChunk]) -> list[tuple[int, TokenLogprob | None] | None]:
        """Run the chunks; for each, the sampled (token, logprob) if it completed its sequence, else None."""
        longest = max(c.num_tokens for c in chunks)
        context = max(c.seq.num_computed + c.num_tokens for c in chunks)
        scratch = self.cache.scratch_slot
        token_ids, positions, slot_mapping, context_slots, context_lens = [], [], [], [], []
        for chunk in chunks:
            seq, start = chunk.seq, chunk.seq.num_computed
            end = start + chunk.num_tokens
            pad = longest - chunk.num_tokens
            ids = seq.all_ids[start:end]
            # Padding tokens repeat the last real one at the same position, write to the scratch slot,
            # and so attend to valid keys only; their outputs are discarded.
            token_ids.append(ids + [ids[-1]] * pad)
            positions.append(list(range(start, end)) + [end - 1] * pad)
            slot_mapping.append(self._slots(seq.block_table, start, end) + [scratch] * pad)
            context_slots.append(self._slots(seq.block_table, 0, end) + [scratch] * (context - end))
            context_lens.append(end)
        as_tensor = lambda rows: torch.tensor(rows, dtype=torch.long, device=self.device)  # noqa: E731
        self.cache.set_batch(as_tensor(slot_mapping), as_tensor(context_slots), as_tensor(context_lens))
        with torch.inference_mode():
            hidden = self.model(as_tensor(token_ids), as_tensor(positions), self.cache)
            done = [row for row, c in enumerate(chunks) if c.completes]
            if not done:
                return [None] * len(chunks)
            # Only the rows that sample a token need logits: the vocabulary projection is the widest matmul.
            rows = torch.tensor(done, device=self.device)
            last = torch.tensor([chunks[row].num_tokens - 1 for row in done], device=self.device)
            logits = self.model.compute_logits(hidden[rows, last])
            seqs = [chunks[row].seq for row in done]
            tokens, logprobs = sample_batch(
                logits,
                [seq.params for seq in seqs],
                [seq.generator for seq in seqs],
                [seq.prompt_ids for seq in seqs],
                [seq.output_ids for seq in seqs],
            )
        results: list[tuple[int, TokenLogprob | None] | None] = [None] * len(chunks)
        for row, token, logprob in zip(done, tokens, logprobs):
            results[row] = (token, logprob)
        return results
