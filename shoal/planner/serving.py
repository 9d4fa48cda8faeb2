"""Serving at a given concurrency (phase "both"): prefill and decode sharing the chips through chunked
prefill, or on separate prefill and decode instances; predicts output and input tokens/s, TPOT, TTFT.

A steady state of a closed loop: `concurrency` users each send a request, wait for its last token and
send the next. `d` of them are decoding at any time; the rest are waiting for or in prefill. Each step
carries the decoders' tokens plus prompt tokens enough to keep up with the requests that finish
(d x input_len / output_len per step, within the scheduler's token budget, as vLLM, SGLang and
TensorRT-LLM schedule chunked prefill). A request's prefill spans its prompt over the budget left by
the decoders, and queues behind others (M/D/1 waiting, so the queue grows as the budget fills). `d`
is the value for which decoders plus requests in prefill make up the concurrency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shoal.planner.cost import Deployment, Factors, decode_step_time, forward_cost, max_decode_seqs, \
    prefill_time
from shoal.planner.shapes import ModelShape


@dataclass
class Serving:
    """The steady state of one deployment at a concurrency."""

    decoding: float  # sequences decoding at once (the rest wait for or are in prefill)
    step_s: float  # seconds of one decode step (colocated: with its prompt chunk)
    output_tps: float  # output tokens/s of the whole deployment
    input_tps: float  # prompt tokens/s
    tpot_s: float
    ttft_s: float
    bound: str  # what limits it: "concurrency", "memory", "prefill" (budget or prefill instance)


def _queue_factor(rho: float) -> float:
    """Time in prefill over one prefill's service time: service plus M/D/1 waiting."""
    return 1.0 + rho / (2.0 * (1.0 - rho))


def _solve(fill, low: float, high: float, iters: int = 24) -> float:
    """The d in [low, high] at which fill(d) (decoders plus requests in prefill, minus concurrency)
    crosses zero; fill is increasing."""
    for _ in range(iters):
        mid = (low + high) / 2
        if fill(mid) > 0:
            high = mid
        else:
            low = mid
        if high - low < 1e-3 * high:
            break
    return low


def mixed_step_time(shape: ModelShape, dep: Deployment, factors: Factors, decoding: float, prompt_tokens: float,
                    input_len: int, cached: int, context: float, chunk_tokens: int = 8192) -> float:
    """Seconds of one chunked-prefill step: `decoding` sequences' tokens (and drafts) at `context`
    cached tokens, plus `prompt_tokens` prompt tokens of prompts of `input_len` (`cached` already cached)."""
    pp = dep.layout.pp
    per_seq = 1 + dep.mtp_tokens
    d, p = decoding / pp, prompt_tokens / pp
    new = max(input_len - cached, 1)
    prompts = p / new  # prompts whose chunk is in this step (fractions: a chunk of one)
    decode_tokens = d * per_seq
    # a prompt token attends, on average, over its cached prefix and half of its own new part
    prefill_keys = p * (cached + new / 2)
    kv_read = d * context + max(prompts, min(p, 1.0)) * (cached + new / 2)
    # a prompt is chunked to what one data-parallel group's share of the budget leaves beside its decoders
    chunk = min(new, max(chunk_tokens / dep.layout.dp - decode_tokens / dep.layout.dp, 1.0))
    stage = forward_cost(shape, dep, factors, decode_tokens + p, decode_tokens * context + prefill_keys, kv_read,
                         decode_tokens + prompts, "mixed", prefill_tokens=p, prefill_keys=prefill_keys,
                         prefill_chunk=chunk)
    total = stage.total_s
    if dep.mtp_tokens and d > 0:
        draft = forward_cost(shape, dep, factors, d, d * context, d * context, d, "decode")
        total += dep.mtp_tokens * draft.total_s * (shape.mtp_layers or 1) / (shape.layers / pp)
    return pp * total


def colocated(shape: ModelShape, dep: Deployment, factors: Factors, concurrency: float, input_len: int,
              output_len: int, cached: int = 0, chunk_tokens: int = 8192) -> Serving:
    """Prefill and decode on the same chips, the prompt tokens riding in the decode steps."""
    tps = dep.tokens_per_step
    new = max(input_len - cached, 1)
    context = input_len + output_len / 2
    per_seq = 1 + dep.mtp_tokens
    cap = min(float(max_decode_seqs(shape, dep, int(context))), concurrency)
    if cap <= 0:
        return Serving(0.0, math.inf, 0.0, 0.0, math.inf, math.inf, "memory")
    steps_out = output_len / tps  # decode steps a request spends decoding

    def state(d: float) -> tuple[float, float, float]:
        """(prompt tokens per step, budget utilisation, requests in prefill) with d decoding."""
        prompt = d * new / steps_out
        budget = chunk_tokens - d * per_seq
        if budget <= 0:
            return prompt, math.inf, math.inf
        rho = prompt / budget
        if rho >= 1:
            return prompt, rho, math.inf
        steps_in = max(1.0, new / budget)  # steps one prompt spans at the budget left
        return prompt, rho, d / steps_out * steps_in * _queue_factor(rho)

    def fill(d: float) -> float:
        return d + state(d)[2] - concurrency

    if fill(cap) <= 0:
        d, bound = cap, "memory"
    else:
        d = _solve(fill, 0.0, cap)
        bound = "prefill" if state(d)[1] > 0.5 else "concurrency"
    d = max(d, 1e-6)
    prompt, _, in_prefill = state(d)
    if not math.isfinite(in_prefill):
        in_prefill = concurrency - d
    in_prefill = max(in_prefill, concurrency - d)
    step = mixed_step_time(shape, dep, factors, d, prompt, input_len, cached, context, chunk_tokens)
    requests_per_s = d / steps_out / step
    return Serving(d, step, requests_per_s * output_len, requests_per_s * input_len, step / tps,
                   in_prefill / requests_per_s, bound)


def disaggregated(shape: ModelShape, prefill_dep: Deployment, decode_dep: Deployment, factors: Factors,
                  decode_factors: Factors, concurrency: float, input_len: int, output_len: int, cached: int = 0,
                  chunk_tokens: int = 8192) -> Serving:
    """Prefill on one instance, decode on another; the KV cache crosses the scale-out network."""
    tps = decode_dep.tokens_per_step
    context = input_len + output_len / 2
    prompts = max(1, int(chunk_tokens * prefill_dep.layout.dp // max(input_len - cached, 1)))
    batch_s = prefill_time(shape, prefill_dep, factors, prompts, input_len, cached)[0]
    prompts_per_s = prompts / batch_s  # the prefill instance's capacity
    kv_s = input_len * shape.kv_bytes_per_token(decode_dep.kv_dtype) / (
        decode_dep.chip.scaleout_gbps * 1e9 * decode_factors.link * decode_dep.layout.chips)
    cap = min(float(max_decode_seqs(shape, decode_dep, int(context))), concurrency)
    if cap <= 0:
        return Serving(0.0, math.inf, 0.0, 0.0, math.inf, math.inf, "memory")
    cache: dict[float, float] = {}

    def step(d: float) -> float:
        if d not in cache:
            cache[d] = decode_step_time(shape, decode_dep, decode_factors, max(d, 1e-6), context)[0]
        return cache[d]

    def in_prefill(d: float) -> float:
        rate = d * tps / output_len / step(d)  # requests/s the decoders finish (and so take in)
        rho = rate / prompts_per_s
        if rho >= 1:
            return math.inf
        return rate * (batch_s * _queue_factor(rho) + kv_s)

    def fill(d: float) -> float:
        return d + in_prefill(d) - concurrency

    if fill(cap) <= 0:
        d, bound = cap, "memory"
    else:
        d = _solve(fill, 0.0, cap)
        bound = "prefill" if d * tps / output_len / step(d) / prompts_per_s > 0.5 else "concurrency"
    d = max(d, 1e-6)
    rate = d * tps / output_len / step(d)
    waiting = max(concurrency - d, in_prefill(d) if math.isfinite(in_prefill(d)) else 0.0)
    return Serving(d, step(d), rate * output_len, rate * input_len, step(d) / tps, waiting / rate, bound)
