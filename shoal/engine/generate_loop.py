"""The minimal KV-cached generation loop: one request at a time, prefill then one token per step.

It is a generator that yields text pieces as they become final and returns the RequestOutput, so the
CLI can stream while the Python API simply drains it. The batched serving engine replaces this loop;
both drive the model through the same forward(token_ids, positions, cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generator

import torch

from shoal.errors import InvalidRequestError
from shoal.layers.sampler import make_generator, sample_token, token_logprob
from shoal.models.base import CausalLM
from shoal.outputs import CompletionOutput, RequestOutput, TokenLogprob
from shoal.sampling_params import SamplingParams
from shoal.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class GenerationTarget:
    """Everything the loop needs to know about the loaded model."""

    model: CausalLM
    tokenizer: Tokenizer
    device: torch.device
    cache_dtype: torch.dtype
    eos_token_ids: frozenset[int]
    max_model_len: int


def check_prompt(prompt_ids: list[int], target: GenerationTarget) -> None:
    if not prompt_ids:
        raise InvalidRequestError("the prompt is empty; give at least one token")
    vocab = target.model.config.vocab_size
    bad = [t for t in prompt_ids if not 0 <= t < vocab]
    if bad:
        raise InvalidRequestError(f"prompt token id {bad[0]} is outside the vocabulary (0 to {vocab - 1})")
    if len(prompt_ids) >= target.max_model_len:
        raise InvalidRequestError(
            f"the prompt has {len(prompt_ids)} tokens but the model's context is {target.max_model_len}; shorten it"
        )


def run_generation(
    target: GenerationTarget, prompt_ids: list[int], params: SamplingParams, prompt: str | None = None
) -> Generator[str, None, RequestOutput]:
    check_prompt(prompt_ids, target)
    model = target.model
    budget = min(params.max_tokens, target.max_model_len - len(prompt_ids))
    cache = model.make_cache(1, len(prompt_ids) + budget, target.cache_dtype, target.device)
    generator = make_generator(params)
    detok = IncrementalDetokenizer(target.tokenizer, params.skip_special_tokens)
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(target.eos_token_ids))
    holdback = max((len(s) for s in params.stop), default=1) - 1  # text that might still become a stop string
    out_ids: list[int] = []
    logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
    finish_reason = "length"
    emitted = 0
    text = ""

    step_ids = torch.tensor([prompt_ids], device=target.device)
    positions = torch.arange(len(prompt_ids), device=target.device)[None]
    with torch.inference_mode():
        while True:
            hidden = model(step_ids, positions, cache)
            logits = model.compute_logits(hidden[0, -1])
            token = sample_token(logits, params, generator)
            out_ids.append(token)
            if logprobs is not None:
                logprobs.append(token_logprob(logits, token, params.logprobs or 0))
            detok.add(token)
            text = detok.text
            if token in stop_ids:
                finish_reason = "stop"
                break
            stop_at = _find_stop(text, params.stop, emitted)
            if stop_at is not None:
                text = text[:stop_at]
                finish_reason = "stop"
                break
            if len(out_ids) >= budget:
                break
            safe = len(text) - holdback
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
            step_ids = torch.tensor([[token]], device=target.device)
            positions = positions[:, -1:] + 1
    if len(text) > emitted:
        yield text[emitted:]
    completion = CompletionOutput(token_ids=out_ids, text=text, finish_reason=finish_reason, logprobs=logprobs)
    return RequestOutput(prompt=prompt, prompt_token_ids=list(prompt_ids), outputs=[completion])


def _find_stop(text: str, stops: list[str], emitted: int) -> int | None:
    """Earliest index where a stop string starts, searching only text not yet shown to the user."""
    found = [i for s in stops if (i := text.find(s, max(0, emitted - len(s) + 1))) != -1]
    return min(found) if found else None


def finish(run: Generator[str, None, RequestOutput]) -> RequestOutput:
    """Run a generation to the end without streaming and return its RequestOutput."""
    while True:
        try:
            next(run)
        except StopIteration as stop:
            return stop.value
