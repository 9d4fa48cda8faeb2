"""Speculative decoding: a draft proposes up to k tokens per decoding sequence, the runner verifies them
in the same forward as the rest of the step (the sequence's chunk is its last token plus the draft, a
small chunked-prefill row over the paged cache), and `verify` keeps the longest prefix the target agrees
with plus one token of its own. Greedy rows keep exactly the tokens plain decoding would pick; sampled
rows go through rejection sampling (shoal.layers.sampler.rejection_sample), so their distribution is the
target's. The engine then rolls the block table back to the accepted length.

Two drafts: `NgramDraft` (prompt lookup, vLLM's `prompt_lookup_min/max`: no weights, any model) and
`MtpDraft` (DeepSeek's multi-token-prediction module from the checkpoint, chained for k > 1). Both
propose deterministically, which is what the rejection sampler here assumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shoal.engine.scheduler import ScheduledChunk
from shoal.engine.sequence import Sequence
from shoal.layers.sampler import (adjusted_scores, batch_logprobs, draw_uniforms, rejection_sample, sample_batch,
                                  sampling_probs)
from shoal.outputs import TokenLogprob

SPECULATIVE_METHODS = ("ngram", "mtp")


@dataclass
class SpeculationStats:
    """Counters behind the acceptance figures (`/metrics`, `shoal bench`)."""

    num_drafts: int = 0  # verification rows: sequences that carried a draft into a step
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_at: list[int] = field(default_factory=list)  # [j]: drafts whose token j was accepted

    def record(self, drafted: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += drafted
        self.num_accepted_tokens += accepted
        if len(self.accepted_at) < drafted:
            self.accepted_at.extend([0] * (drafted - len(self.accepted_at)))
        for j in range(accepted):
            self.accepted_at[j] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification: the accepted drafts plus the target's own token."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def acceptance_per_position(self) -> list[float]:
        return [n / self.num_drafts for n in self.accepted_at] if self.num_drafts else []


def verify(logits: torch.Tensor, seqs: list[Sequence], drafts: list[list[int]], ops) -> list[list[tuple[int, TokenLogprob | None]]]:
    """logits [sum(len(draft) + 1), vocab]: each sequence's rows for its last token and each draft token, in
    order -> the tokens it emits this step (accepted drafts, then the target's own), with logprobs."""
    params, prompts, histories = [], [], []
    for seq, draft in zip(seqs, drafts):
        for j in range(len(draft) + 1):  # row j follows the outputs and the first j draft tokens
            params.append(seq.params)
            prompts.append(seq.prompt_ids)
            histories.append(seq.output_ids + draft[:j])
    greedy = all(p.greedy for p in params)
    if greedy:
        # Each row's token is exactly what plain decoding picks after the same history.
        picked, logprobs = sample_batch(logits, params, None, prompts, histories, ops=ops)
    else:
        scores = adjusted_scores(logits.float(), params, prompts, histories)
    results, row = [], 0
    for seq, draft in zip(seqs, drafts):
        rows = range(row, row + len(draft) + 1)
        row += len(draft) + 1
        if greedy or seq.params.greedy:
            if greedy:
                tokens, marks = [picked[r] for r in rows], [logprobs[r] for r in rows]
            else:
                sub = scores[rows.start : rows.stop]
                tokens = ops.argmax(sub).tolist()
                marks = batch_logprobs(logits[rows.start : rows.stop], tokens, params[rows.start : rows.stop])
            kept = next((j for j, (t, d) in enumerate(zip(tokens, draft)) if t != d), len(draft))
            results.append(list(zip(tokens[: kept + 1], marks[: kept + 1])))
            continue
        probs = sampling_probs(scores[rows.start : rows.stop], params[rows.start : rows.stop])
        tokens = rejection_sample(probs, draft, draw_uniforms([seq.generator] * (len(draft) + 1)))
        marks = batch_logprobs(logits[rows.start : rows.start + len(tokens)], tokens,
                               params[rows.start : rows.start + len(tokens)])
        results.append(list(zip(tokens, marks)))
    return results


class NgramDraft:
    """Prompt lookup: find the latest earlier occurrence of the sequence's last n tokens (n from
    `max_n` down to `min_n`, the longest that matches wins) and propose the tokens that followed it.
    Where those run into the sequence's end, the copy goes on over what it has just proposed (an
    overlapping copy, as in LZ77): a sequence in a loop of period p gets k tokens of the loop, not p."""

    def __init__(self, min_n: int = 1, max_n: int = 4) -> None:
        self.min_n, self.max_n = min_n, max_n

    def propose(self, chunks: list[ScheduledChunk]) -> None:
        for chunk in chunks:
            chunk.draft = self.lookup(chunk.seq.all_ids, chunk.max_draft)

    def lookup(self, ids: list[int], k: int) -> list[int]:
        if k <= 0:
            return []
        for n in range(min(self.max_n, len(ids) - 1), self.min_n - 1, -1):
            suffix = ids[-n:]
            for start in range(len(ids) - n - 1, -1, -1):  # latest first; the suffix itself excluded
                if ids[start : start + n] == suffix:
                    out: list[int] = []
                    for pos in range(start + n, start + n + k):
                        out.append(ids[pos] if pos < len(ids) else out[pos - len(ids)])
                    return out
        return []


class MtpDraft:
    """DeepSeek's MTP module as the draft: position p combines the target's final hidden state at p with
    the embedding of token p + 1 and predicts token p + 2; for k > 1 its own output stands in for the
    target's hidden state at the next position (chained, as vLLM and SGLang run it).

    The module keeps a KV cache of its own (layer num_hidden_layers of the paged cache). It runs right
    after each target step (`after_step`, called by the runner) over exactly the step's rows, in the
    step's layout, with the step's hidden states and each row's next token — now known: the prompt's, the
    sampled one, or a verified draft's — so no layout of its own is built and nothing is held between
    steps but each sequence's first draft token and the module's state for it (`Sequence.mtp_draft`).
    A row past a rejected draft gets a stand-in token; its cache entries are written again when that
    position is computed anew. Further draft tokens (k > 1) are chained in `propose`, one token per
    sequence per link."""

    def __init__(self, model, runner, scheduler) -> None:
        self.model, self.runner, self.scheduler = model, runner, scheduler

    def after_step(self, chunks: list[ScheduledChunk], results: list, hidden: torch.Tensor, token_ids: list[int],
                   positions: torch.Tensor, offsets: list[int]) -> None:
        """The module over the step the runner just ran (its cache batch still set): each sequence that
        sampled a token gets its next first draft token. While the scheduler drafts for nobody
        (speculative_max_batch) the module does not run either; drafting resumes a step after it is back
        (the positions computed meanwhile are not in the module's cache, which only lowers acceptance)."""
        if not self.scheduler.drafting:
            for chunk in chunks:
                chunk.seq.mtp_draft, chunk.seq.mtp_state = [], None
            return
        vocab = self.model.config.vocab_size
        next_ids, picks = list(token_ids), []
        for chunk, offset, result in zip(chunks, offsets, results):
            seq = chunk.seq
            seq.mtp_draft, seq.mtp_state = [], None
            ids, start = seq.all_ids, seq.num_computed
            if isinstance(result, list):  # a verified draft: row j's next token is the j-th kept one
                kept = [t for t, _ in result]
                rows = chunk.num_tokens + len(chunk.draft)
                next_ids[offset : offset + rows] = [kept[min(j, len(kept) - 1)] for j in range(rows)]
                last = offset + len(kept) - 1
            else:
                n = chunk.num_tokens
                next_ids[offset : offset + n - 1] = ids[start + 1 : start + n]
                next_ids[offset + n - 1] = ids[start + n] if result is None else result[0]
                last = offset + n - 1
            if result is not None and seq.guide is None:  # it decodes next (never drafted under a grammar)
                picks.append((seq, last))
        # The sampler marks non-finite rows with -1 (the engine fails those requests); keep the embedding in range.
        next_ids = [t if 0 <= t < vocab else 0 for t in next_ids]
        out = self.model.mtp_forward(self.runner.tensor([next_ids]), hidden[None], positions, self.runner.cache)[0]
        if not picks:
            return
        states = out.index_select(0, self.runner.tensor([row for _, row in picks]))
        tokens = self.model.ops.argmax(self.model.mtp_logits(states)).tolist()
        for i, ((seq, _), token) in enumerate(zip(picks, tokens)):
            seq.mtp_draft, seq.mtp_state = [token], states[i : i + 1]

    def propose(self, chunks: list[ScheduledChunk]) -> None:
        chunks = [c for c in chunks if c.max_draft > 0 and c.seq.mtp_draft]
        for chunk in chunks:
            chunk.draft.extend(chunk.seq.mtp_draft)
        chunks = [c for c in chunks if c.max_draft > 1]
        if not chunks:
            return
        with torch.inference_mode():
            tokens = [c.draft[0] for c in chunks]
            h = torch.cat([c.seq.mtp_state for c in chunks])
            for j in range(1, max(c.max_draft for c in chunks)):
                # The next link: one token per sequence, at the position after the last draft's.
                rows = [(c.seq.block_table, c.seq.num_computed + j - 1, [token]) for c, token in zip(chunks, tokens)]
                h = self._run(rows, h)
                tokens = self.model.ops.argmax(self.model.mtp_logits(h)).tolist()
                for chunk, token in zip(chunks, tokens):
                    chunk.draft.append(token)
                live = [i for i, c in enumerate(chunks) if j + 1 < c.max_draft]
                if not live:
                    break
                h = h.index_select(0, torch.tensor(live, device=h.device))
                chunks, tokens = [chunks[i] for i in live], [tokens[i] for i in live]

    def _run(self, rows, hidden: torch.Tensor) -> torch.Tensor:
        """The MTP module over one-token rows (block table, position, [token id]) with the matching hidden
        states -> its output per row (a decode step, which the backend may replay)."""
        batch, token_ids, positions, _ = self.runner.layout(rows)
        self.runner.cache.set_batch(batch)
        return self.model.mtp_forward(self.runner.tensor([token_ids]), hidden[None], self.runner.tensor([positions]),
                                      self.runner.cache)[0]


def make_draft(method: str | None, model, runner, scheduler):
    if method is None:
        return None
    if method == "ngram":
        return NgramDraft()
    if method == "mtp":
        return MtpDraft(model, runner, scheduler)
    raise ValueError(f"speculative method must be one of {', '.join(SPECULATIVE_METHODS)}, got {method!r}")
