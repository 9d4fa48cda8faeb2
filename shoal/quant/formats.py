"""The quantized weight formats as values: what a checkpoint reader yields, what a quantized layer
stores, and what the offline writer saves. Each one knows its logical shape, how to dequantize, how
to cut a range of output rows (for merged and per-expert layers), and how to be made from a float
matrix (round-to-nearest, no calibration data).

  Int8ChannelWeight   w[o, i] = q[o, i] * scales[o]                            q int8
  Int4GroupWeight     w[o, i] = (u[o, i] - 8) * scales[o, g] + zeros[o, g]     u uint4 in 0..15, g = i // group
  Fp8BlockWeight      w[o, i] = f[o, i] * scale_inv[o // 128, i // 128]        f float8_e4m3fn (DeepSeek-V3)

Int4's (scale, zero) pair is torch's own int4 kernel convention ("tinygemm"): any affine uint4 layout
maps onto it exactly — an integer zero point z gives zeros = (8 - z) * scale, a float minimum m
(w = u * d + m) gives zeros = 8 * d + m.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from shoal.errors import ConfigError

INT4_GROUP_SIZES = (32, 64, 128)
FP8_BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# Rows are quantized this many float32 values at a time: the float32 temporaries of a whole embedding
# table (Llama 3's 128256 x 4096) would be several GB on top of the loaded weights.
QUANTIZE_CHUNK = 1 << 24


def _row_chunks(w: torch.Tensor) -> list[torch.Tensor]:
    """w cut along its output rows (dim -2) into pieces of about QUANTIZE_CHUNK values (views, no copy)."""
    rows = w.shape[-2]
    per_row = w.numel() // max(rows, 1)
    step = max(1, QUANTIZE_CHUNK // max(per_row, 1))
    return [w[..., i:i + step, :] for i in range(0, rows, step)]


def _check_group(in_features: int, group_size: int, name: str) -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise ConfigError(f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, got {group_size}")
    if in_features % group_size:
        divisors = [g for g in INT4_GROUP_SIZES if in_features % g == 0]
        hint = f"use --group-size {divisors[-1]}" if divisors else "use --quant int8 for this model"
        raise ConfigError(
            f"int4 group size {group_size} does not divide the input size {in_features} of {name}; {hint}"
        )


@dataclass
class Int8ChannelWeight:
    """int8 weights with one scale per output channel (symmetric, no zero point)."""

    qweight: torch.Tensor  # int8 [..., out, in]
    scales: torch.Tensor  # [..., out], float

    kind = "int8"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.qweight.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.qweight.to(torch.float32) * self.scales.to(torch.float32)[..., None]).to(dtype)

    def rows(self, start: int, end: int) -> Int8ChannelWeight:
        return Int8ChannelWeight(self.qweight[..., start:end, :], self.scales[..., start:end])

    @classmethod
    def quantize(cls, w: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> Int8ChannelWeight:
        chunks = _row_chunks(w)
        if len(chunks) > 1:  # each row on its own: the same values as quantizing w whole
            parts = [cls.quantize(c, scale_dtype) for c in chunks]
            return cls(torch.cat([q.qweight for q in parts], -2), torch.cat([q.scales for q in parts], -1))
        w = w.to(torch.float32)
        # Round the scale to its storage dtype first and quantize against the rounded value, so a
        # checkpoint written offline reproduces exactly what quantizing at load gives.
        scales = (w.abs().amax(dim=-1) / 127.0).clamp_min(1e-12).to(scale_dtype)
        q = torch.round(w / scales.to(torch.float32)[..., None]).clamp_(-128, 127).to(torch.int8)
        return cls(q, scales)


@dataclass
class Int4GroupWeight:
    """uint4 weights, two per byte, with a scale and a zero per group of `group_size` inputs."""

    packed: torch.Tensor  # uint8 [..., out, in / 2]: input 2j in the low nibble, 2j + 1 in the high one
    scales: torch.Tensor  # [..., out, in / group_size], float
    zeros: torch.Tensor  # [..., out, in / group_size], float: w = (u - 8) * scale + zero
    group_size: int

    kind = "int4"

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.packed.shape[:-1], self.packed.shape[-1] * 2)

    def unpacked(self) -> torch.Tensor:
        """The uint4 values as uint8 [..., out, in]."""
        low, high = self.packed & 0x0F, self.packed >> 4
        return torch.stack([low, high], dim=-1).flatten(-2)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        u = self.unpacked().to(torch.float32)
        *lead, out, n = u.shape
        grouped = u.view(*lead, out, n // self.group_size, self.group_size)
        w = (grouped - 8.0) * self.scales.to(torch.float32)[..., None] + self.zeros.to(torch.float32)[..., None]
        return w.view(*lead, out, n).to(dtype)

    def rows(self, start: int, end: int) -> Int4GroupWeight:
        return Int4GroupWeight(
            self.packed[..., start:end, :], self.scales[..., start:end, :], self.zeros[..., start:end, :],
            self.group_size,
        )

    @staticmethod
    def pack(u: torch.Tensor) -> torch.Tensor:
        """uint4 values [..., in] (any integer dtype, 0..15) -> uint8 [..., in / 2], low nibble first."""
        u = u.to(torch.uint8)
        return u[..., 0::2] | (u[..., 1::2] << 4)

    @classmethod
    def from_uint4(
        cls,
        u: torch.Tensor,
        scales: torch.Tensor,
        group_size: int,
        zero_point: torch.Tensor | int | None = 8,
        offsets: torch.Tensor | None = None,
    ) -> Int4GroupWeight:
        """Build from unpacked uint4 values u [out, in] and per-group scales [out, in / group].

        Either an integer zero point per group (w = (u - zero_point) * scale; 8, the default, is the
        symmetric case, e.g. GGUF Q4_0) or float offsets (w = u * scale + offsets, e.g. GGUF Q4_1).
        """
        scales32 = scales.to(torch.float32)
        if offsets is not None:
            zeros = 8.0 * scales32 + offsets.to(torch.float32)
        else:
            zp = torch.as_tensor(8 if zero_point is None else zero_point, dtype=torch.float32)
            zeros = (8.0 - zp) * scales32
        return cls(cls.pack(u), scales, zeros.to(scales.dtype), group_size)

    @classmethod
    def quantize(
        cls, w: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.float32, name: str = "weight"
    ) -> Int4GroupWeight:
        """Asymmetric min-max per group, with an integer zero point (so it writes as compressed-tensors)."""
        *lead, out, n = w.shape
        _check_group(n, group_size, name)
        chunks = _row_chunks(w)
        if len(chunks) > 1:  # each row on its own: the same values as quantizing w whole
            parts = [cls.quantize(c, group_size, scale_dtype, name) for c in chunks]
            return cls(*(torch.cat([getattr(q, f) for q in parts], -2) for f in ("packed", "scales", "zeros")),
                       group_size)
        g = w.to(torch.float32).reshape(*lead, out, n // group_size, group_size)
        low = g.amin(dim=-1).clamp(max=0.0)
        high = g.amax(dim=-1).clamp(min=0.0)
        scales = ((high - low) / 15.0).clamp_min(1e-12).to(scale_dtype)
        s32 = scales.to(torch.float32)
        zp = torch.round(-low / s32).clamp_(0, 15)
        u = torch.round(g / s32[..., None] + zp[..., None]).clamp_(0, 15).to(torch.uint8)
        zeros = ((8.0 - zp) * s32).to(scale_dtype)
        return cls(cls.pack(u.reshape(*lead, out, n)), scales, zeros, group_size)

    def zero_points(self) -> torch.Tensor:
        """The integer zero point of each group (8 - zero / scale), for formats that store one."""
        s = self.scales.to(torch.float32)
        return torch.round(8.0 - self.zeros.to(torch.float32) / torch.where(s == 0, 1.0, s)).clamp_(0, 15)


@dataclass
class Fp8BlockWeight:
    """float8_e4m3fn weights with one float32 scale per 128 x 128 block: DeepSeek-V3's checkpoint layout.

    `scale_inv` keeps DeepSeek's name: despite it, it is the multiplier (w = f * scale_inv).
    """

    weight: torch.Tensor  # float8_e4m3fn [..., out, in]
    scale_inv: torch.Tensor  # float32 [..., ceil(out / 128), ceil(in / 128)]

    kind = "fp8"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    def block_scales(self) -> torch.Tensor:
        """scale_inv expanded to one value per element, [..., out, in]."""
        out, n = self.weight.shape[-2:]
        s = self.scale_inv.repeat_interleave(FP8_BLOCK, dim=-2)[..., :out, :]
        return s.repeat_interleave(FP8_BLOCK, dim=-1)[..., :n]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.to(torch.float32) * self.block_scales().to(torch.float32)).to(dtype)

    def rows(self, start: int, end: int) -> Fp8BlockWeight:
        if start % FP8_BLOCK:
            raise ConfigError(f"fp8 block weights can only be cut at multiples of {FP8_BLOCK} rows, not {start}")
        return Fp8BlockWeight(
            self.weight[..., start:end, :], self.scale_inv[..., start // FP8_BLOCK : math.ceil(end / FP8_BLOCK), :]
        )

    @classmethod
    def quantize(cls, w: torch.Tensor) -> Fp8BlockWeight:
        out, n = w.shape[-2:]
        lead = w.shape[:-2]
        rb, cb = math.ceil(out / FP8_BLOCK), math.ceil(n / FP8_BLOCK)
        padded = torch.zeros(*lead, rb * FP8_BLOCK, cb * FP8_BLOCK, dtype=torch.float32)
        padded[..., :out, :n] = w.to(torch.float32)
        blocks = padded.view(*lead, rb, FP8_BLOCK, cb, FP8_BLOCK)
        scale_inv = (blocks.abs().amax(dim=(-3, -1)) / FP8_MAX).clamp_min(1e-12)
        scaled = blocks / scale_inv[..., :, None, :, None]
        f = scaled.view(*lead, rb * FP8_BLOCK, cb * FP8_BLOCK)[..., :out, :n].to(torch.float8_e4m3fn)
        return cls(f.contiguous(), scale_inv)


QuantizedWeight = Int8ChannelWeight | Int4GroupWeight | Fp8BlockWeight


def is_quantized(value: object) -> bool:
    return isinstance(value, (Int8ChannelWeight, Int4GroupWeight, Fp8BlockWeight))


def as_float(value: torch.Tensor | QuantizedWeight) -> torch.Tensor:
    """A float32 view of any incoming weight: dequantized if it is quantized."""
    if isinstance(value, torch.Tensor):
        return value.to(torch.float32)
    return value.dequantize(torch.float32)
