"""LLMEngine: the step loop. Requests are added at any time; each `step()` schedules a batch, runs it,
appends sampled tokens, and returns the sequences that advanced. `LLM.generate` drains it offline;
a server drives it request by request.

Failures stay with the request that caused them: a sampled id outside the vocabulary (non-finite logits)
fails that sequence alone, and when the forward pass raises, each chunk of the step is run again on its
own so that only the sequences that still fail end (finish reason "error", `Sequence.error` says why).
Anything that raises outside the forward pass leaves the engine's state unknown, so it propagates.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from shoal.engine.block_manager import BlockManager
from shoal.engine.grammar import GrammarCompiler
from shoal.engine.runner import ModelRunner
from shoal.engine.scheduler import Scheduler
from shoal.engine.sequence import Sequence
from shoal.engine.speculative import MtpDraft, SpeculationStats, make_draft
from shoal.errors import InvalidRequestError
from shoal.layers.paged_kv_cache import PagedKVCache
from shoal.models.base import CausalLM
from shoal.sampling_params import SamplingParams
from shoal.tokenizer import Tokenizer

DEFAULT_BLOCK_SIZE = 16
logger = logging.getLogger("shoal.engine")


class StepFailed:
    """A chunk's result when its step failed for it alone: the sequence ends with `reason`."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


@dataclass(frozen=True)
class StepRecord:
    """One step as `LLMEngine.on_step` sees it: how many sequences and tokens it ran, and how long it took
    (scheduling, the forward pass, sampling and applying the tokens)."""

    num_seqs: int
    num_tokens: int
    seconds: float

    @property
    def decode(self) -> bool:
        """A pure decode step: one new token per sequence, no prompt chunk."""
        return self.num_tokens == self.num_seqs


class LLMEngine:
    def __init__(
        self,
        model: CausalLM,
        tokenizer: Tokenizer,
        device: torch.device,
        cache_dtype: torch.dtype,
        eos_token_ids: frozenset[int],
        max_model_len: int,
        kv_cache_bytes: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        enable_prefix_caching: bool = True,
        kv_quant: str | None = None,
        parallel=None,
        speculative: str | None = None,
        num_speculative_tokens: int = 0,
        speculative_max_batch: int | None = None,
    ) -> None:
        """`parallel`: rank 0's handle on a split model (shoal.parallel.driver.Driver), else None.
        `speculative`: "ngram" or "mtp" (shoal.engine.speculative), with `num_speculative_tokens` drafts
        while at most `speculative_max_batch` sequences run (None: at any batch size)."""
        self.model, self.tokenizer = model, tokenizer
        self.eos_token_ids, self.max_model_len = eos_token_ids, max_model_len
        if parallel is None:
            shapes = model.cache_entry_shapes()
            layers = model.num_cache_layers
            per_block = PagedKVCache.bytes_per_block(layers, block_size, shapes, cache_dtype, kv_quant)
            num_blocks = max(1, kv_cache_bytes // per_block)
            self.cache = PagedKVCache(layers, num_blocks, block_size, shapes, cache_dtype, device, kv_quant, model.ops)
            self.runner = ModelRunner(model, self.cache, device)
        else:
            self.cache, self.runner = parallel.make_runner(kv_cache_bytes, block_size, kv_quant)
            num_blocks = self.cache.num_blocks
        # ModelRunner.step scores prompt tokens (SamplingParams.prompt_logprobs); a runner with its own step (a
        # split model's) does not yet.
        self.scores_prompts = type(self.runner).step is ModelRunner.step
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens,
                                   num_speculative_tokens if speculative is not None else 0, speculative_max_batch)
        self.draft = make_draft(speculative, model, self.runner, self.scheduler)
        if isinstance(self.draft, MtpDraft):
            self.runner.after_step = self.draft.after_step
        self.speculation = SpeculationStats()
        self.sequences: dict[str, Sequence] = {}
        self.grammars = GrammarCompiler(tokenizer, eos_token_ids, model.config.vocab_size)  # structured outputs
        self.depth = getattr(self.runner, "depth", 1)  # micro-batches in flight (pipeline stages)
        self.in_flight: deque = deque()
        self._load: dict[int, list[int]] = {}
        self._load_at = float("-inf")
        # Called (in the thread that steps) after each step that ran; a server's metrics, a benchmark.
        self.on_step: Callable[[StepRecord], None] | None = None
        # Everything alive now (the model's modules and tensors, the tokenizer) moves out of the cyclic
        # garbage collector's generations, so that its full collections while serving do not walk it:
        # an ad-hoc perf profile of MoE decode showed ~3% of the time in gc_collect_main before.
        gc.freeze()

    def check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty; give at least one token")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt token id {bad[0]} is outside the vocabulary (0 to {vocab - 1})")
        if len(prompt_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(prompt_ids)} tokens but the model's context is {self.max_model_len}; shorten it"
            )

    def add_request(
        self, prompt_ids: list[int], params: SamplingParams, prompt: str | None = None, request_id: str | None = None
    ) -> Sequence:
        self.check_prompt(prompt_ids)
        if params.prompt_logprobs is not None and not self.scores_prompts:
            raise InvalidRequestError("prompt_logprobs are not supported on a model split over several devices yet")
        if params.pooling is not None and not self.scores_prompts:
            raise InvalidRequestError("embeddings (pooling) are not supported on a model split over several devices yet")
        if params.logit_bias and max(params.logit_bias) >= self.model.config.vocab_size:
            raise InvalidRequestError(
                f"logit_bias names token id {max(params.logit_bias)}, outside the vocabulary "
                f"(0 to {self.model.config.vocab_size - 1})"
            )
        guide = self.grammars.matcher(params.structured_outputs) if params.structured_outputs is not None else None
        seq = Sequence(prompt_ids, params, self.tokenizer, self.eos_token_ids, self.max_model_len, prompt, request_id)
        seq.guide = guide
        self.scheduler.add(seq)
        self.sequences[seq.request_id] = seq
        return seq

    def abort(self, request_id: str) -> None:
        seq = self.sequences.pop(request_id, None)
        if seq is not None:
            self.scheduler.finish(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[Sequence]:
        """One batch: returns the sequences that got a new token (finished ones are released).

        With a pipeline (depth > 1), first fills the pipeline with micro-batches of sequences that have
        no step in flight, then completes the oldest one."""
        if self.depth > 1:
            return self._pipelined_step()
        start = time.perf_counter()
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        if self.draft is not None:
            self.draft.propose([c for c in chunks if c.max_draft])
        try:
            results = self.runner.step(chunks)
        except Exception:
            if self.failure() is not None:  # a worker of a split model is gone: nothing can run
                raise
            logger.exception("a step of %d sequences failed; running each on its own to find the failing ones",
                             len(chunks))
            results = [self._step_alone(chunk) for chunk in chunks]
        advanced = self._apply(chunks, results)
        if self.on_step is not None:
            self.on_step(StepRecord(len(chunks), sum(c.num_tokens for c in chunks), time.perf_counter() - start))
        return advanced

    def _step_alone(self, chunk):
        try:
            return self.runner.step([chunk])[0]
        except Exception as exc:
            if self.failure() is not None:
                raise
            logger.exception("request %s fails on its own; it ends with an error", chunk.seq.request_id)
            return StepFailed(f"the engine could not run this request ({type(exc).__name__}); the server goes on "
                              "serving others — retry, and report it if it persists")

    def _pipelined_step(self) -> list[Sequence]:
        while len(self.in_flight) < self.depth:
            ready = sum(not s.in_flight for s in self.scheduler.running) + len(self.scheduler.waiting)
            free_slots = self.depth - len(self.in_flight)
            chunks = self.scheduler.schedule(max_chunks=max(1, -(-ready // free_slots)))
            if not chunks:
                break
            for chunk in chunks:
                chunk.seq.in_flight = True
            self.in_flight.append(self.runner.launch(chunks))
        if not self.in_flight:
            return []
        launched = self.in_flight.popleft()
        results = self.runner.collect(launched)
        for chunk in launched.chunks:
            chunk.seq.in_flight = False
        return self._apply(launched.chunks, results)

    def _apply(self, chunks, results) -> list[Sequence]:
        """Apply a step's results; the returned sequences got a token, or failed (`seq.error`)."""
        advanced = []
        vocab = self.model.config.vocab_size
        for chunk, result in zip(chunks, results):
            seq = chunk.seq
            if seq.is_finished:  # aborted while its step was in flight
                continue
            sampled = result if isinstance(result, list) else [result]
            if result is not None and not isinstance(result, StepFailed) and not all(0 <= t < vocab for t, _ in sampled):
                # The sampler marks a row whose probabilities were not finite with -1; any id outside the
                # vocabulary would break the next step's embedding for the whole batch.
                result = StepFailed("the model's scores for this request were not finite numbers, so no token "
                                    "could be sampled; retry with other sampling parameters")
            if isinstance(result, StepFailed):
                seq.fail(result.reason)
                self.scheduler.finish(seq)
                self.sequences.pop(seq.request_id, None)
                advanced.append(seq)
                continue
            if isinstance(result, list):  # a verified draft: the accepted tokens and the target's own
                self.speculation.record(len(chunk.draft), len(result) - 1)
                seq.num_computed += len(result)  # the last token and the accepted drafts are in the cache
            else:
                seq.num_computed += chunk.num_tokens
            if chunk.max_draft:
                self.block_manager.trim(seq.block_table, seq.num_computed + 1)  # roll back past the rejection
            self.block_manager.register_full_blocks(seq.block_table, seq.all_ids[: seq.num_computed], seq.block_hashes)
            if result is None:
                continue
            for token, logprob in sampled:
                seq.append_token(token, logprob)
                if seq.is_finished:  # a stop token, string or max_tokens: the rest of the draft is dropped
                    break
            advanced.append(seq)
            if seq.is_finished:
                self.scheduler.finish(seq)
                self.sequences.pop(seq.request_id, None)
        return advanced

    def expert_load(self, max_age: float = 1.0) -> dict[int, list[int]]:
        """Tokens routed to each expert since start, by MoE layer ({} for a dense model); counts are
        re-read at most every `max_age` seconds (they live on the devices)."""
        if hasattr(self.runner, "expert_load"):
            return self.runner.expert_load(max_age)
        from shoal.parallel.runtime import expert_load_table, table_to_dict

        now = time.monotonic()
        if now - self._load_at >= max_age:
            self._load, self._load_at = table_to_dict(expert_load_table(self.model, None)), now
        return self._load

    def failure(self) -> str | None:
        """Why the engine cannot run (a worker of a split model stopped), or None."""
        failure = getattr(self.runner, "failure", None)
        return failure.reason if failure is not None else None
