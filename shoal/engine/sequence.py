"""Sequence: one request's state as it moves through the engine — its tokens, its KV blocks, how much
of it has been computed, and its text, stop conditions and logprobs."""

from __future__ import annotations

import enum
import itertools
import logging

import torch

from shoal.layers.sampler import make_generator
from shoal.outputs import CompletionOutput, RequestOutput, TokenLogprob
from shoal.sampling_params import SamplingParams
from shoal.tokenizer import IncrementalDetokenizer, Tokenizer

_ids = itertools.count()
logger = logging.getLogger("shoal.engine")


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        tokenizer: Tokenizer,
        eos_token_ids: frozenset[int],
        max_model_len: int,
        prompt: str | None = None,
        request_id: str | None = None,
    ) -> None:
        self.seq_id = next(_ids)
        self.request_id = request_id or str(self.seq_id)
        self.prompt = prompt
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.status = Status.WAITING
        self.num_computed = 0  # tokens whose keys and values are in the cache
        self.in_flight = False  # a pipelined step holding this sequence has not come back yet
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []
        self.generator: torch.Generator | None = make_generator(params)
        self.detok = IncrementalDetokenizer(tokenizer, params.skip_special_tokens)
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        self.max_output = min(params.max_tokens, max_model_len - len(prompt_ids))
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        # Filled by the runner as prefill chunks run; the first prompt token has nothing before it.
        self.prompt_logprobs: list[TokenLogprob | None] | None = [None] if params.prompt_logprobs is not None else None
        # With params.pooling: the sum of the prompt's hidden states so far and the positions it covers, then the
        # pooled vector once the whole prompt has run (shoal.engine.runner._pool).
        self.pooled_sum: torch.Tensor | None = None
        self.pooled_upto = 0
        self.embedding: list[float] | None = None
        self.finish_reason: str | None = None
        self.guide = None  # its grammar's matcher (shoal.engine.grammar) under structured outputs
        self.error: str | None = None  # why the engine could not generate for it (see `fail`)
        # Speculative decoding with an MTP draft: the first draft token for the next step, and the MTP
        # module's output it came from (what a chained draft continues from; see MtpDraft).
        self.mtp_draft: list[int] = []
        self.mtp_state: torch.Tensor | None = None
        self.text = ""
        self.emitted = 0  # characters of text already handed to a streaming caller
        self._holdback = max((len(s) for s in params.stop), default=1) - 1

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def needs_prompt_logprobs(self) -> bool:
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_ids)

    @property
    def needs_prompt_states(self) -> bool:
        """Every prompt token must run through the model (its logits or hidden state is asked for), so no cached
        prefix may stand in for it."""
        return self.needs_prompt_logprobs or (self.params.pooling is not None and self.embedding is None)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def append_token(self, token: int, logprob: TokenLogprob | None) -> None:
        """Add a sampled token; decide whether the sequence is now finished and why."""
        self.output_ids.append(token)
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        self.detok.add(token)
        self.text = self.detok.text
        if self.guide is not None and not self.guide.accept(token):
            # The sampler only picks tokens the grammar allows; a refusal means a bug, not a bad request.
            logger.error("request %s: its grammar refused token %d (%s); the completion ends here",
                         self.request_id, token, self.guide.error)
            self.finish_reason = "stop"
        elif token in self.stop_ids:
            self.finish_reason = "stop"
        else:
            stop_at = self._find_stop()
            if stop_at is not None:
                self.text = self.text[:stop_at]
                self.finish_reason = "stop"
            elif self.guide is not None and self.guide.finished:  # complete: nothing but its end may follow
                self.finish_reason = "stop"
            elif len(self.output_ids) >= self.max_output:
                self.finish_reason = "length"
        if self.finish_reason is not None:
            self.status = Status.FINISHED

    def fail(self, reason: str) -> None:
        """End the sequence because its step failed (finish reason "error"); the engine goes on with the rest."""
        self.error = reason
        self.finish_reason = "error"
        self.status = Status.FINISHED

    def _find_stop(self) -> int | None:
        found = [i for s in self.params.stop if (i := self.text.find(s, max(0, self.emitted - len(s) + 1))) != -1]
        return min(found) if found else None

    def take_new_text(self) -> str:
        """Text that is final now (a possible stop string's beginning is held back until it resolves)."""
        end = len(self.text) if self.is_finished else len(self.text) - self._holdback
        if end <= self.emitted:
            return ""
        piece = self.text[self.emitted : end]
        self.emitted = end
        return piece

    def reset_for_recompute(self) -> None:
        """After preemption: the cache is gone, so everything is computed again (prompt and outputs)."""
        self.num_computed = 0
        self.block_hashes.clear()
        self.mtp_draft, self.mtp_state = [], None
        self.status = Status.WAITING

    def to_completion(self, index: int = 0) -> CompletionOutput:
        return CompletionOutput(
            token_ids=list(self.output_ids), text=self.text, finish_reason=self.finish_reason or "length",
            logprobs=self.logprobs, index=index,
        )

    def to_output(self) -> RequestOutput:
        return RequestOutput(prompt=self.prompt, prompt_token_ids=list(self.prompt_ids), outputs=[self.to_completion()],
                             prompt_logprobs=self.prompt_logprobs, embedding=self.embedding)
