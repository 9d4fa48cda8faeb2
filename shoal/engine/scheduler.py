"""Scheduler: continuous batching. Each step decides which sequences run and how many tokens each.

Running sequences go first (one token each when decoding, the next chunk when still prefilling),
then waiting ones join while the token budget (`max_num_batched_tokens`) lasts, so a long prompt
is prefilled in chunks instead of stalling everyone's decoding. When KV blocks run out, the newest
running sequence is preempted: its blocks are freed and it waits to be recomputed — never dropped.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from shoal.engine.block_manager import BlockManager
from shoal.engine.sequence import Sequence, Status
from shoal.errors import InvalidRequestError


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # how many of the sequence's uncomputed tokens run this step
    # Speculative decoding: how many draft tokens the scheduler made room for after the sequence's last
    # token (blocks and batch budget), and the ones the draft proposed (at most that many).
    max_draft: int = 0
    draft: list[int] = field(default_factory=list)

    @property
    def completes(self) -> bool:
        """Whether this chunk reaches the end of the sequence, so a token is sampled after it."""
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 num_speculative_tokens: int = 0, speculative_max_batch: int | None = None):
        self.blocks = block_manager
        self.num_speculative_tokens = num_speculative_tokens
        self.speculative_max_batch = speculative_max_batch
        self.drafting = False  # whether this step's decoding sequences may carry drafts (see schedule)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        needed = -(-(len(seq.prompt_ids) + 1) // self.blocks.block_size)
        if needed > self.blocks.num_blocks:
            raise InvalidRequestError(
                f"the prompt needs {needed} KV blocks but the cache has only {self.blocks.num_blocks}; "
                "give the KV cache more memory or shorten the prompt"
            )
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence's blocks."""
        self.blocks.free(seq.block_table)
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        self.running.remove(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _draft_room(self, seq: Sequence, n: int, budget: int) -> int:
        """Draft tokens a decoding sequence may carry this step: as many as asked, within its max_tokens, the
        step's budget and the free blocks (speculation never preempts anyone)."""
        if not self.drafting or n != 1 or seq.num_computed + 1 != seq.num_tokens or seq.guide is not None:
            return 0
        k = min(self.num_speculative_tokens, seq.max_output - len(seq.output_ids) - 1, budget - 1)
        if k <= 0 or not self.blocks.grow(seq.block_table, seq.num_tokens + k):
            return 0
        return k

    def schedule(self, max_chunks: int | None = None) -> list[ScheduledChunk]:
        """The next step's chunks (at most `max_chunks` sequences: a pipeline's micro-batch). Sequences
        with a step still in flight are left out and never preempted."""
        budget = self.max_num_batched_tokens
        limit = max_chunks or self.max_num_seqs
        cap = self.speculative_max_batch
        self.drafting = bool(self.num_speculative_tokens) and (cap is None or len(self.running) <= cap)
        chunks: list[ScheduledChunk] = []
        preempted = False
        for seq in list(self.running):
            if seq not in self.running or budget == 0 or seq.in_flight or len(chunks) >= limit:
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            k = self._draft_room(seq, n, budget)
            if k:
                chunks.append(ScheduledChunk(seq, n, max_draft=k))
                budget -= n + k
                continue
            grown = True
            while not self.blocks.grow(seq.block_table, seq.num_computed + n):
                # The newest: it has waited least and holds the least work.
                victim = next((s for s in reversed(self.running) if not s.in_flight), None)
                if victim is None:
                    grown = False
                    break
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if not grown or seq.status is not Status.RUNNING:
                continue
            chunks.append(ScheduledChunk(seq, n))
            budget -= n
        while (self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted
               and len(chunks) < limit):
            seq = self.waiting[0]
            if seq.num_computed == 0 and not seq.block_table and not seq.needs_prompt_states:
                # Reuse cached blocks of a shared prefix; always leave the last token to compute for its logits
                # (a sequence that wants prompt logprobs or an embedding computes every token).
                blocks, hashes = self.blocks.match_prefix(seq.all_ids, seq.num_tokens - 1)
                seq.block_table.extend(blocks)
                seq.block_hashes.extend(hashes)
                seq.num_computed = len(blocks) * self.blocks.block_size
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self.blocks.grow(seq.block_table, seq.num_computed + n):
                self.blocks.free(seq.block_table)  # give back the prefix it matched; it retries next step
                seq.reset_for_recompute()
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, n))
            budget -= n
        return chunks
