"""Turns one step's logits into the next token of every sequence in the batch: penalties (repetition,
frequency, presence), then greedy, or temperature with min-p / top-k / top-p filters, sampled with a
per-request seeded generator; also reports logprobs of the raw model distribution.

logit_bias is added after the penalties; prompt_token_logprobs scores the prompt itself (evaluation).
A TokenMask (structured outputs, built by shoal.engine.grammar) then sets the logits of the tokens a row's
grammar does not allow to -inf, greedy rows too; the tokens it allows keep their scores.

The whole batch goes through one set of tensor operations (one softmax per step). Each row draws its
uniform number from its own generator, so a seeded request's draws do not depend on what else shares
its batch. Its tokens match a lone run only as far as its logits do: the forward pass is not
batch-invariant (a matmul over 64 rows may round differently from one over 1), so a token near a tie
can flip, and the rest of the completion follows it. Same seed, same batch: same tokens.
"""

from __future__ import annotations

import math

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from shoal.backends.ops import REFERENCE, Ops
from shoal.outputs import TokenLogprob
from shoal.sampling_params import SamplingParams


@dataclass
class TokenMask:
    """The tokens some rows of a batch may take next: `allowed` [len(rows), vocab] bool, one row per entry of
    `rows` (the batch rows it constrains; the others are free)."""

    rows: list[int]
    allowed: torch.Tensor


def apply_token_mask(scores: torch.Tensor, mask: TokenMask) -> torch.Tensor:
    """scores [batch, vocab] -> a copy where each masked row's disallowed tokens score -inf."""
    allowed = mask.allowed.to(scores.device)
    if mask.rows == list(range(scores.shape[0])):
        return torch.where(allowed, scores, float("-inf"))
    rows = torch.tensor(mask.rows, device=scores.device)
    return scores.index_copy(0, rows, torch.where(allowed, scores.index_select(0, rows), float("-inf")))


def make_generator(params: SamplingParams) -> torch.Generator | None:
    # Sampling draws on the CPU: every backend has a CPU generator, so a seed means the same thing everywhere.
    if params.seed is None:
        return None
    return torch.Generator(device="cpu").manual_seed(params.seed)


def apply_penalties(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
) -> torch.Tensor:
    """logits [batch, vocab] -> a penalised copy, as vLLM does it.

    repetition_penalty (HF semantics) over the prompt and the output: a positive logit is divided by it,
    a negative one multiplied; then frequency_penalty x (times generated) and presence_penalty x
    (generated at all) are subtracted (OpenAI semantics, over the output only). Only the logits of tokens
    in a row's history are touched (gather / scatter), so the cost follows the history, not the vocabulary.
    """
    vocab = logits.shape[1]
    device, dtype = logits.device, logits.dtype
    out = logits.clone()
    rep = [p.repetition_penalty for p in params]
    if any(r != 1 for r in rep):
        history = [list(p) + list(o) for p, o in zip(prompt_ids, output_ids)]
        # Pad each row with its own first token: the duplicate writes carry the same penalised value.
        ids = _padded(history, [h[0] if h else 0 for h in history], device)
        values = out.gather(1, ids)
        r = torch.tensor(rep, dtype=dtype, device=device)[:, None]
        penalised = torch.where(values > 0, values / r, values * r)
        has_history = torch.tensor([bool(h) for h in history], device=device)[:, None]
        out.scatter_(1, ids, torch.where(has_history, penalised, values))
    if any(p.frequency_penalty or p.presence_penalty for p in params) and any(output_ids):
        # Sorted, each token's occurrences sit together: every one costs frequency_penalty, the first
        # also presence_penalty. Padding (id `vocab`) sorts last and costs nothing.
        ids = _padded(output_ids, [vocab] * len(output_ids), device).sort(dim=1).values
        first = torch.ones_like(ids, dtype=torch.bool)
        first[:, 1:] = ids[:, 1:] != ids[:, :-1]
        freq = torch.tensor([p.frequency_penalty for p in params], dtype=dtype, device=device)[:, None]
        pres = torch.tensor([p.presence_penalty for p in params], dtype=dtype, device=device)[:, None]
        cost = (freq + pres * first) * (ids < vocab)
        out.scatter_add_(1, ids.clamp(max=vocab - 1), -cost)
    return out


def apply_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """logits [batch, vocab] -> a copy with each row's logit_bias added (ids past the vocabulary are ignored;
    the server refuses them first)."""
    out = logits.clone()
    vocab = logits.shape[1]
    for row, p in enumerate(params):
        if not p.logit_bias:
            continue
        items = [(t, b) for t, b in p.logit_bias.items() if t < vocab]
        if items:
            ids = torch.tensor([t for t, _ in items], device=logits.device)
            out[row].index_add_(0, ids, torch.tensor([b for _, b in items], dtype=out.dtype, device=logits.device))
    return out


def prompt_token_logprobs(logits: torch.Tensor, targets: Sequence[int], top_n: int) -> list[TokenLogprob]:
    """logits [rows, vocab] at prompt positions -> each next prompt token's TokenLogprob (its logprob, rank
    and the top_n alternatives) under the raw model distribution."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(list(targets), device=logits.device)[:, None]
    chosen = logprobs.gather(1, target)
    ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
    chosen = chosen.squeeze(1).tolist()
    if top_n:
        top_values, top_ids = torch.topk(logprobs, top_n)
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
    else:
        top_values = top_ids = [[] for _ in targets]
    return [
        TokenLogprob(token_id=int(t), logprob=float(v), top_logprobs=dict(zip(i, tv)), rank=int(r))
        for t, v, r, i, tv in zip(targets, chosen, ranks, top_ids, top_values)
    ]


def _padded(rows: Sequence[Sequence[int]], pads: Sequence[int], device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([list(r) + [pad] * (width - len(r)) for r, pad in zip(rows, pads)], device=device)


def filtered_probs(scores: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature-scaled scores [batch, vocab] -> probabilities after min-p, top-k and top-p (vLLM's order:
    min-p and top-k each keep a most-likely prefix, so they commute; top-p then applies to what is left).

    Each filter becomes a per-row cut-off probability and keeps every token at or above it, so tokens tied
    at the cut-off are all kept and the result does not depend on how a sort breaks ties. Rows are not
    renormalised: zeroed tokens are simply out of the draw, which scales by the row's sum.
    """
    vocab = scores.shape[1]
    device = scores.device
    probs = scores.softmax(dim=-1)  # the one softmax of the step
    min_p = torch.tensor([p.min_p for p in params], dtype=probs.dtype, device=device)
    if bool((min_p > 0).any()):
        threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    filtered = [row for row, p in enumerate(params) if top_k[row] or p.top_p < 1]
    if not filtered:
        return probs
    if len(filtered) == len(params):
        cutoff = top_k_top_p_cutoffs(probs, top_k, [p.top_p for p in params])
        return probs.masked_fill(probs < cutoff[:, None], 0.0)
    rows = torch.tensor(filtered, device=device)
    sub = probs.index_select(0, rows)
    cutoff = top_k_top_p_cutoffs(sub, [top_k[r] for r in filtered], [params[r].top_p for r in filtered])
    return probs.index_copy(0, rows, sub.masked_fill(sub < cutoff[:, None], 0.0))


def top_k_top_p_cutoffs(probs: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float]) -> torch.Tensor:
    """probs [batch, vocab] -> per row, the smallest probability that top-k (0: off) and then top-p keep.

    Sorting the whole vocabulary is the costly part of top-p on a CPU, so the most likely tokens are
    taken in a window (torch.topk) that widens only until every row's nucleus ends inside it.
    """
    vocab = probs.shape[1]
    device = probs.device
    k = torch.tensor([kk or vocab for kk in top_k], device=device)
    p = torch.tensor(list(top_p), dtype=probs.dtype, device=device)
    remaining = probs.sum(dim=-1)
    width = min(vocab, max(64, max(top_k)))
    while True:
        values = _largest(probs, width)
        ranks = torch.arange(width, device=device)
        values = values.masked_fill(ranks[None, :] >= k[:, None], 0.0)
        cumulative = values.cumsum(dim=-1)
        total = torch.where(k <= width, cumulative[:, -1], remaining)  # the mass top-p is a share of
        # A token is dropped once the tokens before it already cover top_p; the first always stays.
        kept = (cumulative - values <= p[:, None] * total[:, None]).sum(dim=-1)
        if width == vocab or bool(((k <= width) | (kept < width)).all()):
            break
        width = width * 8 if width * 64 < vocab else vocab
    last = torch.minimum(kept, k).clamp(min=1) - 1
    return values.gather(1, last[:, None]).squeeze(1)


def _largest(probs: torch.Tensor, width: int) -> torch.Tensor:
    """The `width` largest values of each row, in descending order."""
    if width < probs.shape[1]:
        return probs.topk(width, dim=-1).values
    if probs.device.type == "cpu" and probs.dtype == torch.float32:
        # numpy's vectorised sort is about ten times faster than torch.sort on a CPU for a whole vocabulary
        return torch.from_numpy(np.ascontiguousarray(np.sort(probs.numpy(), axis=-1)[:, ::-1]))
    return probs.sort(dim=-1, descending=True).values


def draw_uniforms(generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One uniform number in [0, 1) per row: from the row's own generator when seeded, else the global one."""
    values = torch.rand(len(generators), dtype=torch.float64)
    for row, generator in enumerate(generators):
        if generator is not None:
            values[row] = torch.rand(1, generator=generator, dtype=torch.float64)
    return values


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """probs [batch, vocab] (unnormalised, >= 0), uniforms [batch] in [0, 1) -> one token per row.

    Picks the first token whose cumulative mass reaches t = (1 - u) x (the row's mass), with t in
    (0, mass]: a token with zero probability is never picked, since its cumulative mass equals the one
    before it, which already reached t (or is 0 < t, for leading zeros).
    """
    cdf = probs.cumsum(dim=-1)
    share = (1.0 - uniforms).to(cdf.dtype).to(cdf.device)  # cast first: not every device has float64
    target = share[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=False).squeeze(1)


def sample_batch(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None] | None = None,
    prompt_ids: Sequence[Sequence[int]] | None = None,
    output_ids: Sequence[Sequence[int]] | None = None,
    ops: Ops = REFERENCE,
    mask: TokenMask | None = None,
) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits [batch, vocab] -> (one token id per row, its TokenLogprob where params.logprobs is set).

    A sampled row whose probabilities are not finite gets token id -1 (the caller fails that request).

    prompt_ids and output_ids (one list per row) feed the penalties; they may be omitted when no row
    has one. Logprobs are always those of the raw logits, before penalties, temperature and filters.
    `ops`: the model's (its argmax picks the greedy rows' tokens); `mask`: the rows' allowed tokens, if any.
    """
    batch = logits.shape[0]
    generators = list(generators) if generators is not None else [None] * batch
    sampled = [row for row, p in enumerate(params) if not p.greedy]
    penalties = any(p.has_penalties for p in params)
    biased = any(p.logit_bias for p in params)
    if not sampled and not penalties and not biased and mask is None and all(p.logprobs is None for p in params):
        # Greedy alone: the raw logits' argmax (bf16 ones need no float32 copy: the conversion is exact).
        return greedy_tokens(logits, ops).tolist(), [None] * batch
    logits = logits.float()
    scores = adjusted_scores(logits, params, prompt_ids, output_ids, mask)
    tokens = greedy_tokens(scores, ops) if len(sampled) < batch else None
    if sampled:
        if len(sampled) < batch:
            rows = torch.tensor(sampled, device=scores.device)
            sub_scores, sub_params = scores.index_select(0, rows), [params[r] for r in sampled]
        else:
            rows, sub_scores, sub_params = None, scores, list(params)
        temperature = torch.tensor([p.temperature for p in sub_params], dtype=scores.dtype, device=scores.device)
        probs = filtered_probs(sub_scores / temperature[:, None], sub_params)
        chosen = inverse_cdf(probs, draw_uniforms([generators[r] for r in sampled]))
        # A row without a finite, positive mass has no distribution to draw from (its logits held NaN or
        # Inf): it gets -1, which the engine turns into that request's error instead of a bad embedding index.
        mass = probs.sum(dim=-1)
        chosen = chosen.masked_fill(~(torch.isfinite(mass) & (mass > 0)), -1)
        if rows is None:
            tokens = chosen
        else:
            tokens = tokens.index_copy(0, rows, chosen)
    token_list = tokens.tolist()
    return token_list, batch_logprobs(logits, token_list, params)


def adjusted_scores(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[Sequence[int]] | None = None,
    output_ids: Sequence[Sequence[int]] | None = None,
    mask: TokenMask | None = None,
) -> torch.Tensor:
    """float32 logits [batch, vocab] with each row's penalties, logit bias and allowed-token mask applied."""
    scores = logits
    if any(p.has_penalties for p in params):
        if prompt_ids is None or output_ids is None:
            raise ValueError("penalties need each row's prompt_ids and output_ids")
        scores = apply_penalties(scores, params, prompt_ids, output_ids)
    if any(p.logit_bias for p in params):
        scores = apply_logit_bias(scores, params)
    if mask is not None:
        scores = apply_token_mask(scores, mask)
    return scores


def sampling_probs(scores: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Adjusted scores [batch, vocab] of sampled (temperature > 0) rows -> the distribution each row draws
    from (temperature, min-p, top-k, top-p), normalised: what `sample_batch` samples."""
    temperature = torch.tensor([p.temperature for p in params], dtype=scores.dtype, device=scores.device)
    probs = filtered_probs(scores / temperature[:, None], params)
    return probs / probs.sum(dim=-1, keepdim=True)


def rejection_sample(probs: torch.Tensor, draft: Sequence[int], uniforms: torch.Tensor) -> list[int]:
    """Speculative sampling (Leviathan et al. 2023) for a draft that proposed its tokens deterministically
    (n-gram lookup, a greedy draft model): the emitted tokens are distributed exactly as sampling `probs`
    one token at a time.

    probs [k + 1, vocab]: the target's distribution at each draft position and the one after; draft: the
    k proposed tokens; uniforms [k + 1]: draws in [0, 1). Draft token j is kept with probability
    p_j(d_j) (min(1, p/q) with q one-hot); at the first rejection the token is drawn from p_j with d_j
    removed (the normalised max(p - q, 0)) and the rest is dropped; if all k are kept, one more token is
    drawn from p_k. Returns the accepted tokens and that last one (1 to k + 1 tokens); -1 marks a row
    without a finite, positive mass.
    """
    out: list[int] = []
    for j, token in enumerate(draft):
        row = probs[j]
        mass = float(row.sum())
        if not (math.isfinite(mass) and mass > 0):
            return out + [-1]
        # One uniform decides acceptance and, scaled into the rejected share, draws the replacement.
        u = float(uniforms[j])
        p = float(row[token])
        if u < p:
            out.append(token)
            continue
        residual = row.clone()
        residual[token] = 0.0
        if float(residual.sum()) <= 0:
            return out + [token]  # p_j(d_j) == 1 up to rounding: nothing else can be drawn
        share = (u - p) / max(1.0 - p, 1e-300)  # uniform in [0, 1) given rejection
        out.append(int(inverse_cdf(residual[None], torch.tensor([min(share, 1.0 - 1e-12)], dtype=torch.float64))[0]))
        return out
    last = probs[len(draft)]
    mass = float(last.sum())
    if not (math.isfinite(mass) and mass > 0):
        return out + [-1]
    out.append(int(inverse_cdf(last[None], uniforms[len(draft) :][:1])[0]))
    return out


def greedy_tokens(scores: torch.Tensor, ops: Ops = REFERENCE) -> torch.Tensor:
    """Each row's first maximum, as argmax, through the backend's Ops.argmax (on the CPU one C pass over
    bf16 or float32 rows; the reference max().indices, where NaN ranks first)."""
    return ops.argmax(scores)


def batch_logprobs(
    logits: torch.Tensor, tokens: Sequence[int], params: Sequence[SamplingParams]
) -> list[TokenLogprob | None]:
    """Each row's TokenLogprob under the raw logits (None where logprobs were not asked for)."""
    result: list[TokenLogprob | None] = [None] * len(params)
    wanted = [row for row, p in enumerate(params) if p.logprobs is not None]
    if not wanted:
        return result
    rows = torch.tensor(wanted, device=logits.device)
    logprobs = torch.log_softmax(logits.index_select(0, rows).float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor([[max(tokens[r], 0)] for r in wanted], device=logits.device)).squeeze(1)
    top_n = max(params[r].logprobs for r in wanted)
    top_values, top_ids = (torch.topk(logprobs, top_n) if top_n else (logprobs[:, :0], logprobs[:, :0].long()))
    chosen, top_values, top_ids = chosen.tolist(), top_values.tolist(), top_ids.tolist()
    for i, row in enumerate(wanted):
        n = params[row].logprobs
        top = {int(t): float(v) for t, v in zip(top_ids[i][:n], top_values[i][:n])}
        result[row] = TokenLogprob(token_id=int(tokens[row]), logprob=float(chosen[i]), top_logprobs=top)
    return result


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits [vocab] -> the chosen token id (one row of `sample_batch`, without penalties' history)."""
    if params.has_penalties:
        raise ValueError("sample_token has no token history; use sample_batch for penalties")
    tokens, _ = sample_batch(logits[None, :], [params], [generator])
    return tokens[0]


def token_logprob(logits: torch.Tensor, token_id: int, top_n: int) -> TokenLogprob:
    """Logprob of the chosen token and the top_n alternatives, under the unmodified model distribution."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top: dict[int, float] = {}
    if top_n:
        values, ids = torch.topk(logprobs, top_n)
        top = {int(i): float(v) for i, v in zip(ids.tolist(), values.tolist())}
    return TokenLogprob(token_id=token_id, logprob=float(logprobs[token_id]), top_logprobs=top)
