"""ModelRunner: runs one engine step — one forward over every scheduled chunk, packed end to end
without padding (see PagedKVCache) — and samples the next token of each sequence whose chunk reached
its end (with speculative decoding, several: see shoal.engine.speculative)."""

from __future__ import annotations

import itertools

import torch

from shoal.engine.grammar import token_mask
from shoal.engine.scheduler import ScheduledChunk
from shoal.engine.speculative import verify
from shoal.layers.paged_kv_cache import PagedBatch, PagedKVCache
from shoal.layers.sampler import prompt_token_logprobs, sample_batch
from shoal.models.base import CausalLM


_PROMPT_LOGITS_ELEMENTS = 1 << 24  # logits held at once while scoring a prompt (64 MiB in float32)


def chunk_rows(chunks: list[ScheduledChunk]) -> list[tuple[list[int], int, list[int]]]:
    """ModelRunner.layout's rows for a step's chunks: each chunk's tokens, and the draft it carries."""
    rows = []
    for chunk in chunks:
        start = chunk.seq.num_computed
        rows.append((chunk.seq.block_table, start, chunk.seq.all_ids[start : start + chunk.num_tokens] + chunk.draft))
    return rows


class ModelRunner:
    def __init__(self, model: CausalLM, cache: PagedKVCache, device: torch.device) -> None:
        self.model, self.cache, self.device = model, cache, device

    def tensor(self, rows) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def layout(self, rows: list[tuple[list[int], int, list[int]]]) -> tuple[PagedBatch, list[int], list[int], list[int]]:
        """rows (block table, first position, token ids), one per sequence -> the step's PagedBatch, and its
        packed token ids, positions and each row's packed offset."""
        size = self.cache.block_size
        lengths = [len(ids) for _, _, ids in rows]
        longest = max(lengths)
        context = max(start + len(ids) for _, start, ids in rows)
        blocks = -(-context // size)
        token_ids, positions, slot_mapping, offsets, context_lens, tables = [], [], [], [], [], []
        for table, start, ids in rows:
            end = start + len(ids)
            offsets.append(len(token_ids))
            token_ids.extend(ids)
            positions.extend(range(start, end))
            slot_mapping.extend(table[p // size] * size + p % size for p in range(start, end))
            context_lens.append(end)
            # Context beyond a sequence's own length is masked out; block 0 only keeps the gather in bounds.
            tables.append(table[:blocks] + [0] * (blocks - len(table[:blocks])))
        within = torch.arange(size, device=self.device)
        block_tensor = self.tensor(tables)
        context_slots = (block_tensor[:, :, None] * size + within).flatten(1)[:, :context]
        start = None
        if len(rows) == 1 and tables[0] == list(range(tables[0][0], tables[0][0] + blocks)):
            start = tables[0][0] * size  # one sequence in consecutive blocks: its context is a view of the pool
        unpack_index = pack_index = None
        if any(n != longest for n in lengths):
            # Padded query rows repeat the chunk's last real token: same position, so a valid mask row.
            unpack_index = self.tensor(
                [[off + min(j, n - 1) for j in range(longest)] for off, n in zip(offsets, lengths)]
            )
            pack_index = self.tensor([row * longest + j for row, n in enumerate(lengths) for j in range(n)])
        batch = PagedBatch(self.tensor(slot_mapping), context_slots, self.tensor(context_lens), unpack_index, pack_index,
                           context_blocks=block_tensor, context_start=start)
        return batch, token_ids, positions, offsets

    def layout_chunks(self, chunks: list[ScheduledChunk]) -> tuple[PagedBatch, list[int], list[int], list[int]]:
        """layout() for a step's chunks, with each chunk's packed offset. A chunk carrying a draft (a decode:
        its last token, then the draft) is laid out as one row per token, each over the context up to
        itself: the step stays one of one token per row, which the backend's decode attention (every row's
        keys are written before any row attends) and its step graphs take, so verifying k drafts costs a
        replayed decode step of k + 1 rows instead of an eager chunked-prefill step."""
        rows, firsts = [], []
        for chunk, row in zip(chunks, chunk_rows(chunks)):
            firsts.append(len(rows))
            if not chunk.draft:
                rows.append(row)
                continue
            table, start, ids = row
            rows.extend((table, start + j, [token]) for j, token in enumerate(ids))
        batch, token_ids, positions, offsets = self.layout(rows)
        return batch, token_ids, positions, [offsets[i] for i in firsts]

    def step(self, chunks: list[ScheduledChunk]) -> list:
        """Run the chunks; for each, what it sampled if it completed its sequence, else None: a (token,
        logprob), or, for a chunk that carried a draft, the list of tokens it keeps (speculative.verify)."""
        batch, token_ids, positions, offsets = self.layout_chunks(chunks)
        self.cache.set_batch(batch)
        with torch.inference_mode():
            position_tensor = self.tensor([positions])
            hidden = self.model(self.tensor([token_ids]), position_tensor, self.cache)[0]
            for row, chunk in enumerate(chunks):
                if chunk.seq.needs_prompt_logprobs:
                    self._prompt_logprobs(chunk, hidden, offsets[row])
                if chunk.seq.params.pooling is not None and chunk.seq.embedding is None:
                    self._pool(chunk, hidden, offsets[row])
            results = self._sample(chunks, hidden, offsets)
            if self.after_step is not None:
                self.after_step(chunks, results, hidden, token_ids, position_tensor, offsets)
        return results

    # Called with each step's (chunks, results, final hidden states, packed token ids, positions, offsets)
    # while its cache batch is still set: the MTP draft runs there (speculative.MtpDraft.after_step).
    after_step = None

    def _sample(self, chunks: list[ScheduledChunk], hidden: torch.Tensor, offsets: list[int]) -> list:
        done = [row for row, c in enumerate(chunks) if c.completes]
        results: list = [None] * len(chunks)
        if not done:
            return results
        # Only the rows that sample a token need logits: the vocabulary projection is the widest matmul.
        last = [offsets[row] + chunks[row].num_tokens - 1 + j for row in done for j in range(len(chunks[row].draft) + 1)]
        logits = self.model.compute_logits(hidden.index_select(0, self.tensor(last)), float32=False)
        plain = [i for i, row in enumerate(done) if not chunks[row].draft]
        if len(plain) < len(done):
            starts = list(itertools.accumulate((len(chunks[row].draft) + 1 for row in done), initial=0))
            drafted = [i for i, row in enumerate(done) if chunks[row].draft]
            spec_rows = self.tensor([r for i in drafted for r in range(starts[i], starts[i + 1])])
            verified = verify(logits.index_select(0, spec_rows), [chunks[done[i]].seq for i in drafted],
                              [chunks[done[i]].draft for i in drafted], self.model.ops)
            for i, kept in zip(drafted, verified):
                results[done[i]] = kept
            logits = logits.index_select(0, self.tensor([starts[i] for i in plain]))
        if not plain:
            return results
        seqs = [chunks[done[i]].seq for i in plain]
        tokens, logprobs = sample_batch(
            logits,
            [seq.params for seq in seqs],
            [seq.generator for seq in seqs],
            [seq.prompt_ids for seq in seqs],
            [seq.output_ids for seq in seqs],
            ops=self.model.ops,
            mask=token_mask([seq.guide for seq in seqs], logits.shape[1]),
        )
        for i, token, logprob in zip(plain, tokens, logprobs):
            results[done[i]] = (token, logprob)
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
