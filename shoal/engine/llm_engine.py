"""LLMEngine: the step loop. Requests are added at any time; each `step()` schedules a batch, runs it,
appends sampled tokens, and returns the sequences that advanced. `LLM.generate` drains it offline;
a server drives it request by request.
"""

from __future__ import annotations

import torch

from shoal.engine.block_manager import BlockManager
from shoal.engine.runner import ModelRunner
from shoal.engine.scheduler import Scheduler
from shoal.engine.sequence import Sequence
from shoal.errors import InvalidRequestError
from shoal.layers.paged_kv_cache import PagedKVCache
from shoal.models.base import CausalLM
from shoal.sampling_params import SamplingParams
from shoal.tokenizer import Tokenizer

DEFAULT_BLOCK_SIZE = 16


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
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.eos_token_ids, self.max_model_len = eos_token_ids, max_model_len
        shapes = model.cache_entry_shapes()
        layers = model.config.num_hidden_layers
        per_block = PagedKVCache.bytes_per_block(layers, block_size, shapes, cache_dtype, kv_quant)
        num_blocks = max(1, kv_cache_bytes // per_block)
        self.cache = PagedKVCache(layers, num_blocks, block_size, shapes, cache_dtype, device, kv_quant)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        self.runner = ModelRunner(model, self.cache, device)
        self.sequences: dict[str, Sequence] = {}

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
        seq = Sequence(prompt_ids, params, self.tokenizer, self.eos_token_ids, self.max_model_len, prompt, request_id)
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
        """One batch: returns the sequences that got a new token (finished ones are released)."""
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        results = self.runner.step(chunks)
        advanced = []
        for chunk, result in zip(chunks, results):
            seq = chunk.seq
            seq.num_computed += chunk.num_tokens
            self.block_manager.register_full_blocks(seq.block_table, seq.all_ids[: seq.num_computed], seq.block_hashes)
            if result is None:
                continue
            seq.append_token(*result)
            advanced.append(seq)
            if seq.is_finished:
                self.scheduler.finish(seq)
                self.sequences.pop(seq.request_id, None)
        return advanced
