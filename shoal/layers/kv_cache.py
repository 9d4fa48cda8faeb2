"""The KV cache handle a model's forward writes into and reads from.

`ContiguousKVCache` keeps one slab per layer for a fixed batch of sequences that advance together;
it backs the simple generation loop. The serving engine's paged cache implements the same methods
(`begin_forward`, `write`, `attention_mask`, and `unpack` / `pack`, which move queries between the
layout the linear layers run in and one row per sequence), so model code never changes between them.
Both also offer `decode_attention()`: for a step of one new token per sequence, the backend's decode
attention (Ops.decode_attention: on the CPU a fused kernel that writes and attends in one call), or None
where it has none for this step.
The paged cache may split a step into parts (`parts()`, run by attention.attend_in_parts); this one
never does.
What a layer stores is the model's choice: keys and values for GQA, the compressed latent for MLA.
"""

from __future__ import annotations

import torch

from shoal.backends.ops import REFERENCE, Ops


def causal_mask(
    positions: torch.Tensor,
    num_keys: int,
    context_lens: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor | None:
    """Bool mask [batch, 1, tokens, keys]: key j is visible to a query at position p when j <= p, j is
    inside its sequence's context, and (with a window) j > p - window. None when every key is visible:
    fused kernels run faster without a mask."""
    keys = torch.arange(num_keys, device=positions.device)
    allowed = keys[None, None, :] <= positions[:, :, None]  # [batch, tokens, keys]
    if context_lens is not None:
        allowed &= keys[None, None, :] < context_lens[:, None, None]
    if sliding_window is not None:
        allowed &= keys[None, None, :] > positions[:, :, None] - sliding_window
    return None if bool(allowed.all()) else allowed[:, None, :, :]


class ContiguousKVCache:
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_len: int,
        entry_shapes: list[tuple[int, ...]],
        dtype: torch.dtype,
        device: torch.device | str,
        ops: Ops = REFERENCE,
    ) -> None:
        self.ops = ops  # the model's: it builds each decode step's attention
        self.max_len = max_len
        self.batch_size = batch_size
        self.layers = [
            [torch.zeros(batch_size, max_len, *shape, dtype=dtype, device=device) for shape in entry_shapes]
            for _ in range(num_layers)
        ]
        self._rows = torch.arange(batch_size, device=device)[:, None]
        self._kv_len = 0
        self._mask: torch.Tensor | None = None
        self._mask_args = None
        self._decode = None  # this forward's Ops.decode_attention

    def bytes_per_token(self) -> int:
        """Cache bytes one token occupies across all layers (the figure MLA shrinks)."""
        return sum(t[0, 0].numel() * t.element_size() for layer in self.layers for t in layer)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """Queries -> one row per sequence for attention; here they already are (see PagedKVCache)."""
        return x

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """Attention output back to the layout the rest of the model runs in; the inverse of unpack."""
        return x

    def begin_forward(self, positions: torch.Tensor, sliding_window: int | None = None) -> None:
        """Called once per forward with positions [batch, tokens]; sizes the reads and builds the mask."""
        if positions.shape[0] != self.batch_size:
            raise ValueError(f"cache holds {self.batch_size} sequences, forward got {positions.shape[0]}")
        kv_len = int(positions.max()) + 1
        if kv_len > self.max_len:
            raise ValueError(f"position {kv_len - 1} is past the cache's {self.max_len} slots")
        self._kv_len = kv_len
        self._mask_args = (positions, kv_len, None, sliding_window)  # built when first asked for
        self._decode = None
        slab = self.layers[0][0] if self.layers and self.layers[0] else None
        if positions.shape[1] == 1 and slab is not None:
            # Slab row b, position p is slot b * max_len + p of the slab seen as [batch * max_len, ...].
            base = self._rows * self.max_len
            keys = torch.arange(kv_len, device=positions.device)
            self._decode = self.ops.decode_attention(
                positions, base[:, 0] + positions[:, 0], base + keys, torch.full((self.batch_size,), kv_len),
                sliding_window, slab,
            )

    def attention_mask(self) -> torch.Tensor | None:
        """Bool mask [batch, 1, tokens, keys] (True = attend) for this forward, or None for 'all keys'."""
        if self._mask_args is not None:
            self._mask, self._mask_args = causal_mask(*self._mask_args), None
        return self._mask

    def decode_attention(self):
        """This forward's fused decode attention (see the module docstring), or None."""
        return self._decode

    def parts(self) -> None:
        """Its sequences always advance together: never split (see PagedKVCache.parts)."""
        return None

    def pools(self, layer: int) -> list[torch.Tensor]:
        """The layer's stores as [slots, ...] (the slots `decode_attention` addresses)."""
        return [slab.view(-1, *slab.shape[2:]) for slab in self.layers[layer]]

    def write(self, layer: int, positions: torch.Tensor, *values: torch.Tensor) -> list[torch.Tensor]:
        """Store this forward's entries [batch, tokens, ...] and return all entries so far [batch, keys, ...]."""
        slabs = self.layers[layer]
        for slab, value in zip(slabs, values):
            slab[self._rows, positions] = value.to(slab.dtype)
        return [slab[:, : self._kv_len] for slab in slabs]
