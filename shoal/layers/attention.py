"""Grouped-query attention over the KV cache, with the attention kernel chosen by the backend."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from shoal.backends.base import AttentionFn
from shoal.layers.kv_cache import ContiguousKVCache


class CachedAttention(nn.Module):
    """Writes this step's keys and values to the cache and attends over everything cached so far."""

    def __init__(self, layer_index: int, scale: float, attention_fn: AttentionFn):
        super().__init__()
        self.layer_index = layer_index
        self.scale = scale
        self.attention_fn = attention_fn

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cache: ContiguousKVCache
    ) -> torch.Tensor:
        """q [b, t, heads, d], k and v [b, t, kv_heads, d] -> [b, t, heads * d_v], in the cache's step
        layout (packed for the paged cache; attention itself runs one row per sequence)."""
        keys, values = cache.write(self.layer_index, positions, k, v)
        q = cache.unpack(q)
        out = self.attention_fn(
            q.transpose(1, 2),
            keys.transpose(1, 2).to(q.dtype),
            values.transpose(1, 2).to(q.dtype),
            cache.attention_mask(),
            self.scale,
        )
        b, _, t, _ = out.shape
        return cache.pack(out.transpose(1, 2).reshape(b, t, -1))


def attend_in_parts(
    attend: Callable[..., torch.Tensor], cache: ContiguousKVCache, positions: torch.Tensor, *inputs: torch.Tensor
) -> torch.Tensor:
    """attend(cache, positions, *inputs) -> [1, tokens, ...] for the step's packed tokens; where the cache
    splits a mixed step (PagedKVCache.parts: decodes apart from prefill chunks), attend runs once per
    part, on that part's rows of positions and inputs and a view of the cache over its sequences, and
    the outputs go back into the step's order."""
    parts = cache.parts()
    if parts is None:
        return attend(cache, positions, *inputs)
    out = None
    for rows, part in parts:
        y = attend(part, positions[:, rows], *(x[:, rows] for x in inputs))
        if out is None:
            out = y.new_empty(y.shape[0], positions.shape[1], *y.shape[2:])
        out[:, rows] = y
    return out
