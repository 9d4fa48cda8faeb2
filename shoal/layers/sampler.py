"""Turns one step's logits into the next token: greedy, or temperature with top-k / top-p filters,
with a per-request seeded generator; also reports logprobs of the raw distribution."""

from __future__ import annotations

import torch

from shoal.outputs import TokenLogprob
from shoal.sampling_params import SamplingParams


def make_generator(params: SamplingParams) -> torch.Generator | None:
    # Sampling draws on the CPU: every backend has a CPU generator, so a seed means the same thing everywhere.
    if params.seed is None:
        return None
    return torch.Generator(device="cpu").manual_seed(params.seed)


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits [vocab] float32 -> the chosen token id."""
    if params.greedy:
        return int(torch.argmax(logits))
    scores = logits.float() / params.temperature
    if params.top_k and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        # Drop a token when the tokens before it already cover top_p; the first token always stays.
        drop = probs.cumsum(dim=-1) - probs > params.top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.empty_like(scores).scatter_(0, order, sorted_scores)
    probs = scores.softmax(dim=-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprob(logits: torch.Tensor, token_id: int, top_n: int) -> TokenLogprob:
    """Logprob of the chosen token and the top_n alternatives, under the unmodified model distribution."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top: dict[int, float] = {}
    if top_n:
        values, ids = torch.topk(logprobs, top_n)
        top = {int(i): float(v) for i, v in zip(ids.tolist(), values.tolist())}
    return TokenLogprob(token_id=token_id, logprob=float(logprobs[token_id]), top_logprobs=top)
