"""LLM: the Python entry point. Loads a checkpoint onto a device and generates from prompts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Generator, Iterator, Sequence


from shoal.backends import parse_device
from shoal.config import EngineConfig
from shoal.engine.kv_pool import KVPool, default_kv_pool
from shoal.engine.llm_engine import LLMEngine
from shoal.engine.sequence import Sequence as EngineSequence
from shoal.errors import GenerationError, InvalidRequestError, ModelNotFoundError
from shoal.loader import build_model, resolve_model_path
from shoal.outputs import RequestOutput
from shoal.sampling_params import SamplingParams
from shoal.tokenizer import Tokenizer

Prompt = str | list[int]
_VLLM_ALIASES = {"tensor_parallel_size": "tp", "pipeline_parallel_size": "pp", "expert_parallel_size": "ep",
                 "distributed_executor_backend": "distributed_executor"}


def read_eos_token_ids(path: Path) -> list[int]:
    """EOS ids from generation_config.json (an int or a list), the file transformers' generate() honours."""
    file = path / "generation_config.json"
    if not file.is_file():
        return []
    try:
        value = json.loads(file.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value] if isinstance(value, list) else []


class LLM:
    """`LLM(model, device=None, dtype=None, quant=None)`; `generate(prompts, SamplingParams(...))`.

    A prompt is a string or a list of token ids. Without `model`, the bundled demo model is used.
    """

    def __init__(self, model: str | Path | None = None, device: str | None = None, dtype=None, **options) -> None:
        for alias, name in _VLLM_ALIASES.items():  # vLLM's spellings of the split sizes
            if alias in options:
                options[name] = options.pop(alias)
        self.config = EngineConfig(model=str(model) if model else None, device=device, dtype=dtype, **options)
        if self.config.model is None and not (Path(self.config.model_path) / "config.json").is_file():
            raise ModelNotFoundError("the bundled demo model is missing from this install; pass a model folder")
        path = resolve_model_path(self.config.model_path)
        gguf_file = None
        self.parallel = None
        if self.config.parallel.enabled:
            self._start_parallel()
            gguf_file = self.parallel.setup.gguf_file
        else:
            if path.is_file():  # a GGUF file, opened once: its header holds the config, tensors and tokenizer
                from shoal.gguf.reader import GGUFFile

                gguf_file = GGUFFile(path)
            backend, index = parse_device(self.config.device)
            backend.set_device(index)
            backend.set_isa_level(self.config.cpu_isa)
            self.backend = backend
            self.device = backend.torch_device(index)
            self.model, self.model_config, self.dtype = build_model(
                gguf_file or path, backend, self.device, self.config.torch_dtype, progress=self.config.progress,
                quant=self.config.quant, quant_group_size=self.config.quant_group_size,
                kernels=self.config.cpu_kernels, mtp=self.config.speculative == "mtp",
            )
            self.model.capture_decode = not self.config.enforce_eager
        if gguf_file is not None:  # the tokenizer lives in the GGUF metadata
            from shoal.gguf.tokenizer import gguf_tokenizer

            self.tokenizer = gguf_tokenizer(gguf_file, self.model_config.vocab_size)
        else:
            self.tokenizer = Tokenizer(path, self.model_config.vocab_size)
        eos = read_eos_token_ids(path) or self.model_config.eos_token_ids
        if not eos and self.tokenizer.eos_token_id is not None:
            eos = [self.tokenizer.eos_token_id]
        max_len = self.model_config.max_position_embeddings
        if self.config.max_model_len:
            max_len = min(max_len, self.config.max_model_len)
        if self.parallel:
            self.kv_pool = self.parallel.kv_pool(max_len)
            kv_bytes = self.kv_pool.bytes
        else:
            kv_bytes = self._kv_cache_bytes(max_len)
        self.engine = LLMEngine(
            self.model,
            self.tokenizer,
            self.device,
            cache_dtype=self.dtype,
            kv_quant=self.config.kv_quant,
            eos_token_ids=frozenset(eos),
            max_model_len=max_len,
            kv_cache_bytes=kv_bytes,
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
            enable_prefix_caching=self.config.enable_prefix_caching,
            parallel=self.parallel,
            speculative=self.config.speculative,
            num_speculative_tokens=self.config.num_speculative_tokens,
            speculative_max_batch=self.config.speculative_max_batch,
        )

    def _start_parallel(self) -> None:
        """Split the model over tp x ep x pp devices; this process is rank 0 and schedules. Under torchrun,
        a process of another rank serves as a worker here until rank 0 stops it, then exits."""
        from shoal.parallel.driver import Driver
        from shoal.parallel.executor import run_worker_if_not_rank0

        if run_worker_if_not_rank0(self.config):
            raise SystemExit(0)
        self.parallel = Driver(self.config)
        setup = self.parallel.setup
        self.backend, self.device = setup.backend, setup.device
        self.model, self.model_config, self.dtype = setup.model, setup.model_config, setup.dtype

    def shutdown(self) -> None:
        """Stop the worker processes of a split model (also done at exit); a no-op on one device."""
        if self.parallel is not None:
            self.parallel.shutdown()

    def _kv_cache_bytes(self, max_len: int) -> int:
        """--kv-cache-memory if given; else shoal.engine.kv_pool's default (kept in self.kv_pool, with why)."""
        if self.config.kv_cache_memory:
            self.kv_pool = KVPool(self.config.kv_cache_memory, "--kv-cache-memory")
            return self.config.kv_cache_memory
        from shoal.layers.paged_kv_cache import PagedKVCache

        per_token = PagedKVCache.bytes_per_block(
            self.model.num_cache_layers, 1, self.model.cache_entry_shapes(), self.dtype, self.config.kv_quant
        )
        free = self.backend.memory_info(self.device.index or 0).free_bytes
        self.kv_pool = default_kv_pool(per_token, max_len, self.config.max_num_seqs, free,
                                       self.device.type == "cpu")
        return self.kv_pool.bytes

    def _prompt_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise InvalidRequestError("a prompt must be a string or a list of token ids")

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt in one continuous batch; one RequestOutput per prompt, in order.

        `sampling_params` is one SamplingParams for every prompt, or a list with one per prompt.

        With n > 1 each prompt runs as n sequences (completion i seeded with seed + i when a seed is given)
        and its RequestOutput holds the n completions. When the prompt fills at least one KV block, the
        other n - 1 start once the first has computed the prompt, so prefix caching shares its blocks.
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise InvalidRequestError(
                    f"got {len(sampling_params)} SamplingParams for {len(prompts)} prompts; pass one for all "
                    "prompts or exactly one per prompt"
                )
            per_prompt = list(sampling_params)
        else:
            per_prompt = [sampling_params or SamplingParams()] * len(prompts)
        parsed = [self._prompt_ids(p) for p in prompts]
        for _, ids in parsed:
            self.engine.check_prompt(ids)  # reject bad input before any request starts
        groups: list[list[EngineSequence]] = []
        pending: list[tuple[EngineSequence, list[int], str | None, list[EngineSequence], list[SamplingParams]]] = []
        for (text, ids), params in zip(parsed, per_prompt):
            copies = completion_params(params)
            group = [self.engine.add_request(ids, copies[0], text)]
            groups.append(group)
            if len(copies) > 1 and self._prompt_blocks(ids) > 0:
                pending.append((group[0], ids, text, group, copies))
            else:
                group.extend(self.engine.add_request(ids, p, text) for p in copies[1:])
        while self.engine.has_unfinished() or pending:
            self.engine.step()
            waiting = []
            for first, ids, text, group, copies in pending:
                if first.is_finished or first.num_computed >= self._prompt_blocks(ids) * self._block_size:
                    group.extend(self.engine.add_request(ids, p, text) for p in copies[1:])
                else:
                    waiting.append((first, ids, text, group, copies))
            pending = waiting
        failed = next((seq for group in groups for seq in group if seq.error is not None), None)
        if failed is not None:
            raise GenerationError(failed.error)
        return [
            RequestOutput(
                prompt=group[0].prompt,
                prompt_token_ids=list(group[0].prompt_ids),
                outputs=[seq.to_completion(index) for index, seq in enumerate(group)],
                prompt_logprobs=group[0].prompt_logprobs,
                embedding=group[0].embedding,
            )
            for group in groups
        ]

    @property
    def _block_size(self) -> int:
        return self.engine.block_manager.block_size

    def _prompt_blocks(self, prompt_ids: list[int]) -> int:
        """Full KV blocks of a prompt that prefix caching can share (0 when it is off)."""
        if not self.engine.block_manager.enable_prefix_caching:
            return 0
        return (len(prompt_ids) - 1) // self._block_size  # the last prompt token is always computed

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text of one completion piece by piece as it is generated."""
        text, ids = self._prompt_ids(prompt)
        yield from self.generation(ids, sampling_params or SamplingParams(), text)

    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation rendered with the checkpoint's chat template."""
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def generation(
        self, prompt_ids: list[int], params: SamplingParams, prompt: str | None = None
    ) -> Generator[str, None, RequestOutput]:
        """One request as a generator: yields text pieces as they become final, returns the RequestOutput."""
        if params.n != 1:
            raise InvalidRequestError("a streamed generation returns one completion; use generate() for n > 1")
        seq = self.engine.add_request(prompt_ids, params, prompt)
        try:
            while not seq.is_finished:
                self.engine.step()
                piece = seq.take_new_text()
                if piece:
                    yield piece
        finally:
            if not seq.is_finished:  # the caller stopped early: free its blocks
                self.engine.abort(seq.request_id)
        if seq.error is not None:
            raise GenerationError(seq.error)
        return seq.to_output()


def completion_params(params: SamplingParams) -> list[SamplingParams]:
    """The n single-completion SamplingParams a request with n completions runs as (seed + i for the i-th)."""
    if params.n == 1:
        return [params]
    return [
        dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + i) for i in range(params.n)
    ]


def finish(run: Generator[str, None, RequestOutput]) -> RequestOutput:
    """Run a generation to the end without streaming and return its RequestOutput."""
    while True:
        try:
            next(run)
        except StopIteration as stop:
            return stop.value
