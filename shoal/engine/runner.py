"""ModelRunner: runs one engine step — one forward over every scheduled chunk, packed end to end
without padding (see PagedKVCache) — and samples the next token of each sequence whose chunk reached
its end."""

from __future__ import annotations

import torch

from shoal.engine.grammar import token_mask
from shoal.engine.scheduler import ScheduledChunk
from shoal.layers.paged_kv_cache import PagedBatch, PagedKVCache
from shoal.layers.sampler import prompt_token_logprobs, sample_batch
from shoal.models.base import CausalLM
from shoal.outputs import TokenLogprob


_PROMPT_LOGITS_ELEMENTS = 1 << 24  # logits held at once while scoring a prompt (64 MiB in float32)


class ModelRunner:
    def __init__(self, model: CausalLM, cache: PagedKVCache, device: torch.device) -> None:
        self.model, self.cache, self.device = model, cache, device

    def _tensor(self, rows) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _layout(self, chunks: list[ScheduledChunk]) -> tuple[PagedBatch, list[int], list[int], list[int]]:
        """The step's PagedBatch, and its packed token ids, positions and each chunk's packed offset."""
        size = self.cache.block_size
        lengths = [c.num_tokens for c in chunks]
        longest = max(lengths)
        context = max(c.seq.num_computed + c.num_tokens for c in chunks)
        blocks = -(-context // size)
        token_ids, positions, slot_mapping, offsets, context_lens, tables = [], [], [], [], [], []
        for chunk in chunks:
            seq, start = chunk.seq, chunk.seq.num_computed
            end = start + chunk.num_tokens
            offsets.append(len(token_ids))
            token_ids.extend(seq.all_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slot_mapping.extend(table[p // size] * size + p % size for p in range(start, end))
            context_lens.append(end)
            # Context beyond a sequence's own length is masked out; block 0 only keeps the gather in bounds.
            tables.append(table[:blocks] + [0] * (blocks - len(table[:blocks])))
        within = torch.arange(size, device=self.device)
        block_tensor = self._tensor(tables)
        context_slots = (block_tensor[:, :, None] * size + within).flatten(1)[:, :context]
        start = None
        if len(chunks) == 1 and tables[0] == list(range(tables[0][0], tables[0][0] + blocks)):
            start = tables[0][0] * size  # one sequence in consecutive blocks: its context is a view of the pool
        unpack_index = pack_index = None
        if any(n != longest for n in lengths):
            # Padded query rows repeat the chunk's last real token: same position, so a valid mask row.
            unpack_index = self._tensor(
                [[off + min(j, n - 1) for j in range(longest)] for off, n in zip(offsets, lengths)]
            )
            pack_index = self._tensor([row * longest + j for row, n in enumerate(lengths) for j in range(n)])
        batch = PagedBatch(self._tensor(slot_mapping), context_slots, self._tensor(context_lens), unpack_index, pack_index,
                           context_blocks=block_tensor, context_start=start)
        return batch, token_ids, positions, offsets

    def step(self, chunks: list[ScheduledChunk]) -> list[tuple[int, TokenLogprob | None] | None]:
        """Run the chunks; for each, the sampled (token, logprob) if it completed its sequence, else None."""
        batch, token_ids, positions, offsets = self._layout(chunks)
        self.cache.set_batch(batch)
        with torch.inference_mode():
            hidden = self.model(self._tensor([token_ids]), self._tensor([positions]), self.cache)[0]
            for row, chunk in enumerate(chunks):
                if chunk.seq.needs_prompt_logprobs:
                    self._prompt_logprobs(chunk, hidden, offsets[row])
                if chunk.seq.params.pooling is not None and chunk.seq.embedding is None:
                    self._pool(chunk, hidden, offsets[row])
            done = [row for row, c in enumerate(chunks) if c.completes]
            if not done:
                return [None] * len(chunks)
            # Only the rows that sample a token need logits: the vocabulary projection is the widest matmul.
            last = self._tensor([offsets[row] + chunks[row].num_tokens - 1 for row in done])
            logits = self.model.compute_logits(hidden.index_select(0, last), float32=False)
            seqs = [chunks[row].seq for row in done]
            tokens, logprobs = sample_batch(
                logits,
                [seq.params for seq in seqs],
                [seq.generator for seq in seqs],
                [seq.prompt_ids for seq in seqs],
                [seq.output_ids for seq in seqs],
                ops=self.model.ops,
                mask=token_mask([seq.guide for seq in seqs], logits.shape[1]),
            )
        results: list[tuple[int, TokenLogprob | None] | None] = [None] * len(chunks)
        for row, token, logprob in zip(done, tokens, logprobs):
            results[row] = (token, logprob)
        return results

    def _pool(self, chunk: ScheduledChunk, hidden: torch.Tensor, offset: int) -> None:
        """Add this chunk's prompt hidden states to its sequence's pool; once the prompt is done, set the
        embedding (the mean, or the last token's). A chunk computed again after preemption adds nothing twice."""
        seq = chunk.seq
        start = seq.num_computed
        first, end = max(start, seq.pooled_upto), min(start + chunk.num_tokens, len(seq.prompt_ids))
        if end <= first:
            return
        rows = hidden[offset + first - start : offset + end - start].float()
        if seq.params.pooling == "mean":
            total = rows.sum(0)
            seq.pooled_sum = total if seq.pooled_sum is None else seq.pooled_sum + total
        seq.pooled_upto = end
        if end == len(seq.prompt_ids):
            pooled = seq.pooled_sum / end if seq.params.pooling == "mean" else rows[-1]
            seq.embedding, seq.pooled_sum = pooled.cpu().tolist(), None

    def _prompt_logprobs(self, chunk: ScheduledChunk, hidden: torch.Tensor, offset: int) -> None:
        """Append the logprobs of the prompt tokens this chunk's positions predict (each position's logits
        predict the next token); rows are projected a slice at a time, so a long chunk over a wide
        vocabulary never holds all its logits at once."""
        seq = chunk.seq
        start = seq.num_computed
        # Positions start..end-1 predict tokens start+1..end; a recomputed chunk skips what is already known.
        first = max(start, len(seq.prompt_logprobs) - 1)
        end = min(start + chunk.num_tokens, len(seq.prompt_ids) - 1)
        width = max(1, _PROMPT_LOGITS_ELEMENTS // self.model.config.vocab_size)
        for lo in range(first, end, width):
            hi = min(end, lo + width)
            rows = hidden[offset + lo - start : offset + hi - start]
            logits = self.model.compute_logits(rows, float32=False)
            seq.prompt_logprobs.extend(
                prompt_token_logprobs(logits, seq.prompt_ids[lo + 1 : hi + 1], seq.params.prompt_logprobs)
            )
