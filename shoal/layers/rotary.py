"""Rotary position embeddings: frequency tables for the default, linear, llama3 and YaRN schemes,
and the two ways of pairing dimensions (Llama's halves, DeepSeek's interleaved pairs)."""

from __future__ import annotations

import math

import torch
from torch import nn

from shoal.models.hf_config import RopeConfig


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction for a context stretched `scale` times."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(rope: RopeConfig, dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for `dim` rotary dimensions, and the factor that scales cos and sin."""
    base = rope.theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (base**exponents)
    if rope.type == "default":
        return inv_freq, 1.0
    if rope.type == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.type == "llama3":
        factor = rope.factor
        old_len = rope.original_max_position_embeddings or max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if rope.type == "yarn":
        return _yarn_frequencies(rope, dim, max_position_embeddings)
    raise ValueError(f"unsupported rope type {rope.type!r}")  # parse_rope already rejected it


def _yarn_frequencies(rope: RopeConfig, dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    base = rope.theta
    original_len = rope.original_max_position_embeddings or max_position_embeddings
    factor = rope.factor
    if rope.attention_factor is not None:
        attention_factor = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # share of each dimension that keeps its original (extrapolated) frequency
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


class RotaryEmbedding(nn.Module):
    """Holds a cos/sin table and rotates query and key slices by their positions.

    interleaved=False pairs dimension i with i + dim/2 (Llama, Qwen, Mistral);
    interleaved=True pairs 2i with 2i+1 (DeepSeek) and returns the rotated pairs de-interleaved
    (all first members, then all second members). Queries and keys get the same permutation, so
    their dot products, and hence attention, are unchanged.
    """

    def __init__(self, rope: RopeConfig, dim: int, max_position_embeddings: int, interleaved: bool = False) -> None:
        super().__init__()
        self._spec = (rope, dim, max_position_embeddings)
        self.interleaved = interleaved
        self._table_len = 0
        self.register_buffer("inv_freq", torch.empty(0), persistent=False)
        self.register_buffer("cos_table", torch.empty(0), persistent=False)
        self.register_buffer("sin_table", torch.empty(0), persistent=False)
        self.materialize_buffers(self.inv_freq.device)

    def materialize_buffers(self, device: torch.device) -> None:
        """Compute the frequencies and a first table on `device` (also after the module was built on the
        meta device, where every tensor it made is an empty shape: shoal.construct.materialize)."""
        rope, dim, max_position_embeddings = self._spec
        with torch.device(device):
            inv_freq, self.attention_factor = rope_frequencies(rope, dim, max_position_embeddings)
            if rope.frequency_factors is not None:
                inv_freq = inv_freq / torch.tensor(rope.frequency_factors, dtype=inv_freq.dtype)
        self.inv_freq = inv_freq
        # Start small and grow on demand: a 160k-position table would cost tens of MB per model.
        self._grow(min(max(max_position_embeddings, 1), 4096))

    def _grow(self, length: int) -> None:
        device = self.inv_freq.device
        positions = torch.arange(length, device=device, dtype=torch.int64).float()
        freqs = positions[:, None] * self.inv_freq.float()[None, :]
        self.cos_table = freqs.cos() * self.attention_factor
        self.sin_table = freqs.sin() * self.attention_factor
        self._table_len = length
        self._memo = None

    def _apply(self, fn, recurse=True):  # keep the float32 table when the module is cast to bf16
        super()._apply(fn, recurse)
        self.inv_freq = self.inv_freq.float()
        self._grow(self._table_len)
        return self

    def _cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [..., tokens, 1, dim/2] for `positions`. Every layer of a forward rotates by the
        same positions tensor, so the lookup (and the max() it needs, a device sync) runs once per forward
        instead of twice per layer; the memo holds the tensor itself, so its identity cannot be reused."""
        memo = self._memo
        if memo is not None and memo[0] is positions:
            return memo[1], memo[2]
        max_pos = int(positions.max()) + 1 if positions.numel() else 0
        if max_pos > self._table_len:
            self._grow(max(max_pos, 2 * self._table_len))
        cos = self.cos_table[positions].unsqueeze(-2)
        sin = self.sin_table[positions].unsqueeze(-2)
        self._memo = (positions, cos, sin)
        return cos, sin

    def tables(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole float32 cos and sin tables [table positions, dim / 2], grown to cover positions below
        `end` (for a fused kernel that looks positions up itself; no torch operator runs unless they grow)."""
        if end > self._table_len:
            self._grow(max(end, 2 * self._table_len))
        return self.cos_table, self.sin_table

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x [..., tokens, heads, dim] where positions is [..., tokens]."""
        cos, sin = self._cos_sin(positions)
        x32 = x.float()
        if self.interleaved:
            x1, x2 = x32[..., 0::2], x32[..., 1::2]
        else:
            half = x32.shape[-1] // 2
            x1, x2 = x32[..., :half], x32[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.to(x.dtype)
