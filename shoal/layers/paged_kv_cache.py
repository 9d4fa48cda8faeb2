"""The paged KV cache: one pool of fixed-size blocks per layer, shared by every running sequence.

The engine's block manager decides which blocks a sequence owns; before each forward the runner
describes the step with a `PagedBatch`: where this step's tokens go (`slot_mapping`) and where each
sequence's context lives (`context_slots`). The model sees the same methods as with
ContiguousKVCache, so model code does not know which cache it runs on. Slot = block * block_size +
offset; the extra last slot is scratch, from which padding context reads.

A step's tokens arrive *packed*: [1, total_tokens], with no padding, so the linear layers — nearly
all of a step's work — never compute a padded row, even when one long prefill chunk shares the step
with many one-token decodes. Only attention needs one row per sequence: `unpack` spreads queries to
[sequences, longest chunk] (padding rows repeat a real query of the same sequence, so they attend to
valid keys only) and `pack` gathers the real rows back. When every chunk has the same length (a
pure decode step) both are free reshapes.

A *mixed* step — one-token decodes beside longer prefill chunks, the usual step of continuous batching —
would pad every decode to the longest chunk: 31 decodes beside a 100-token chunk attend 3100 query rows
instead of 131. So `parts()` splits such a step in two views of this cache, one over the decoding
sequences (which then take the fused decode kernel, as in a pure decode step) and one over the
chunks (padded only among themselves); the attention layers run each part over its own rows
(`attention.attend_in_parts`). The split is derived from the PagedBatch alone, so every rank of a split
model makes the same one.

With `kv_quant` ("int8" or "fp8", see kv_quant.py) each pool holds 8-bit codes and a parallel pool
holds one scale per cached vector; `write` quantizes on the way in and dequantizes after the gather.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import torch

from shoal.backends.ops import REFERENCE, Ops
from shoal.layers.kv_cache import causal_mask
from shoal.layers.kv_quant import bytes_per_entry, dequantize, quantize, storage_dtype


@dataclass
class PagedBatch:
    """One step's layout, built by the runner.

    slot_mapping [tokens]: the cache slot each packed token writes;
    context_slots [sequences, keys]: the slots of each sequence's whole context, this step included;
    context_lens [sequences]: how many of those keys are real;
    unpack_index [sequences, longest]: the packed token each padded query row takes (None when every
    chunk has the same length); pack_index [tokens]: each packed token's row in the flattened padded
    layout (None likewise)."""

    slot_mapping: torch.Tensor
    context_slots: torch.Tensor
    context_lens: torch.Tensor
    unpack_index: torch.Tensor | None = None
    pack_index: torch.Tensor | None = None
    # Optional shortcuts for the gather (the runner sets them; without them the slot-by-slot gather runs):
    # context_blocks [sequences, blocks], the blocks behind context_slots, gathered whole;
    # context_start, set when a lone sequence's context is one run of slots [start, start + keys),
    # which is then read as a view of the pool, without a copy.
    context_blocks: torch.Tensor | None = None
    context_start: int | None = None

    @property
    def num_seqs(self) -> int:
        return self.context_slots.shape[0]


class PagedKVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        entry_shapes: list[tuple[int, ...]],
        dtype: torch.dtype,
        device: torch.device | str,
        kv_quant: str | None = None,
        ops: Ops = REFERENCE,
    ) -> None:
        """dtype: what attention computes in (and, without kv_quant, what the pool stores); ops: the
        model's, which builds each decode step's attention (Ops.decode_attention)."""
        self.ops = ops
        self.num_blocks, self.block_size = num_blocks, block_size
        self.scratch_slot = num_blocks * block_size
        self.dtype, self.kv_quant = dtype, kv_quant
        stored = dtype if kv_quant is None else storage_dtype(kv_quant)
        slots = self.scratch_slot + 1
        self.layers = [
            [torch.zeros(slots, *shape, dtype=stored, device=device) for shape in entry_shapes]
            for _ in range(num_layers)
        ]
        # One float32 scale per cached vector (the last dimension) when quantized.
        self.scales = [
            [torch.ones(slots, *shape[:-1], 1, dtype=torch.float32, device=device) for shape in entry_shapes]
            for _ in range(num_layers)
        ] if kv_quant else None
        self._batch: PagedBatch | None = None
        self._flat_context: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._mask_args = None
        self._decode = None  # this step's Ops.decode_attention
        self._parts: list[tuple[torch.Tensor, PagedKVCache]] | None = None

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, entry_shapes: list[tuple[int, ...]], dtype, kv_quant: str | None = None
    ) -> int:
        per_token = sum(bytes_per_entry(shape, kv_quant, dtype) for shape in entry_shapes)
        return num_layers * block_size * per_token

    def set_batch(self, batch: PagedBatch) -> None:
        self._batch = batch
        self._flat_context = batch.context_slots.flatten()

    # ---- packed <-> one row per sequence --------------------------------------------------
    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[1, tokens, ...] packed -> [sequences, longest, ...], one row per sequence."""
        batch = self._batch
        if batch.unpack_index is None:
            return x.view(batch.num_seqs, -1, *x.shape[2:])
        return x[0][batch.unpack_index]

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[sequences, longest, ...] -> [1, tokens, ...]: the real rows back in packed order."""
        batch = self._batch
        flat = x.reshape(1, -1, *x.shape[2:])
        if batch.pack_index is None:
            return flat
        return flat.index_select(1, batch.pack_index)

    # ---- the model's view (same as ContiguousKVCache) --------------------------------------
    def begin_forward(self, positions: torch.Tensor, sliding_window: int | None = None) -> None:
        """positions [1, tokens], packed; the mask is built for the unpacked queries."""
        batch = self._batch
        keys = batch.context_slots.shape[1]
        self._mask_args = (self.unpack(positions), keys, batch.context_lens, sliding_window)  # built when asked for
        self._decode = None
        self._parts = self._split_mixed(positions, sliding_window) if batch.unpack_index is not None else None
        tokens = batch.slot_mapping.numel()
        pool = next((pools[0] for pools in self.layers if pools), None)  # a pipeline stage holds only its layers
        if (self.kv_quant is None and batch.unpack_index is None and tokens == batch.num_seqs and pool is not None
                and pool.dtype == self.dtype):
            # One new token per sequence: the backend's kernel (the CPU's fused one) writes and attends in one
            # call per layer.
            self._decode = self.ops.decode_attention(
                positions, batch.slot_mapping, batch.context_slots, batch.context_lens, sliding_window, pool
            )

    def parts(self) -> list[tuple[torch.Tensor, PagedKVCache]] | None:
        """For a mixed step, [(packed token rows, a view of this cache over just their sequences)] for the
        decodes and for the longer chunks (see the module docstring); None when the step is one part."""
        return self._parts

    def _split_mixed(self, positions: torch.Tensor, sliding_window: int | None):
        batch = self._batch
        longest = batch.unpack_index.shape[1]
        seq_of_token = torch.div(batch.pack_index, longest, rounding_mode="floor")
        lengths = torch.bincount(seq_of_token, minlength=batch.num_seqs)
        single = lengths == 1
        if bool(single.all()) or not bool(single.any()):
            return None
        parts = []
        for chosen in (single, ~single):
            seqs = chosen.nonzero()[:, 0]
            rows = chosen.index_select(0, seq_of_token).nonzero()[:, 0]
            view = copy.copy(self)
            view.set_batch(_sub_batch(batch, seqs, rows, lengths.index_select(0, seqs).tolist(), self.block_size))
            view.begin_forward(positions[:, rows], sliding_window)
            parts.append((rows, view))
        return parts

    def attention_mask(self) -> torch.Tensor | None:
        if self._mask_args is not None:
            self._mask, self._mask_args = causal_mask(*self._mask_args), None
        return self._mask

    def decode_attention(self):
        """This step's fused decode attention (one new token per sequence, on the CPU), or None."""
        return self._decode

    def pools(self, layer: int) -> list[torch.Tensor]:
        """The layer's pools [slots, ...] (the slots `decode_attention` addresses)."""
        return self.layers[layer]

    def write(self, layer: int, positions: torch.Tensor, *values: torch.Tensor) -> list[torch.Tensor]:
        """Store this step's entries (packed [1, tokens, ...]) and return each sequence's whole context
        [sequences, keys, ...]."""
        if self.kv_quant:
            return self._write_quantized(layer, values)
        out = []
        for pool, value in zip(self.layers[layer], values):
            # index_copy_ costs a fraction of advanced-index assignment for a few rows (slots are distinct).
            pool.index_copy_(0, self._batch.slot_mapping, value.reshape(-1, *pool.shape[1:]).to(pool.dtype))
            out.append(self._gather(pool))
        return out

    def _gather(self, pool: torch.Tensor) -> torch.Tensor:
        """Every sequence's context from one pool: [sequences, keys, ...] (a view of the pool when the
        batch's context_start allows it: a lone sequence in consecutive blocks, as at batch-1 decode)."""
        batch = self._batch
        seqs, keys = batch.context_slots.shape
        if batch.context_start is not None:
            return pool[batch.context_start : batch.context_start + keys].unsqueeze(0)
        if batch.context_blocks is not None:
            # Whole blocks: one contiguous copy per block instead of one per slot.
            blocks = pool[: self.scratch_slot].view(self.num_blocks, -1)
            rows = blocks.index_select(0, batch.context_blocks.flatten())
            return rows.view(seqs, -1, *pool.shape[1:])[:, :keys]
        # index_select over a flat view is ~3x faster than advanced indexing for this gather on CPU.
        rows = pool.view(pool.shape[0], -1).index_select(0, self._flat_context)
        return rows.view(seqs, keys, *pool.shape[1:])

    def _write_quantized(self, layer: int, values: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        out = []
        for pool, scales, value in zip(self.layers[layer], self.scales[layer], values):
            codes, scale = quantize(value.reshape(-1, *pool.shape[1:]), self.kv_quant)
            pool.index_copy_(0, self._batch.slot_mapping, codes)
            scales.index_copy_(0, self._batch.slot_mapping, scale)
            out.append(dequantize(self._gather(pool), self._gather(scales), self.kv_quant, self.dtype))
        return out


def _sub_batch(batch: PagedBatch, seqs: torch.Tensor, rows: torch.Tensor, lengths: list[int],
               block_size: int) -> PagedBatch:
    """The PagedBatch of sequences `seqs` of `batch` (whose packed tokens are `rows`, chunk lengths
    `lengths`), with its context trimmed to the longest of theirs."""
    context_lens = batch.context_lens.index_select(0, seqs)
    keys = int(context_lens.max())
    blocks = None
    if batch.context_blocks is not None:
        blocks = batch.context_blocks.index_select(0, seqs)[:, : -(-keys // block_size)]
    unpack_index = pack_index = None
    longest = max(lengths)
    if any(n != longest for n in lengths):
        offsets = [0, *itertools.accumulate(lengths[:-1])]  # each chunk's first row among `rows`
        device = rows.device
        unpack_index = torch.tensor([[off + min(j, n - 1) for j in range(longest)] for off, n in zip(offsets, lengths)],
                                    dtype=torch.long, device=device)
        pack_index = torch.tensor([i * longest + j for i, n in enumerate(lengths) for j in range(n)],
                                  dtype=torch.long, device=device)
    return PagedBatch(batch.slot_mapping.index_select(0, rows), batch.context_slots.index_select(0, seqs)[:, :keys],
                      context_lens, unpack_index, pack_index, context_blocks=blocks)
