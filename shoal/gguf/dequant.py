"""GGUF tensor bytes -> torch. Float types come as they are. Three 4-bit types come as the codes and
per-32 scales of shoal's int4 group-32 format, with no full-precision copy; every quantized type (those
three included) can also be dequantized, by the `gguf` package's own numpy decoders (gguf.quants — the
reference llama.cpp's Python tools use) or, for Q8_0 / Q4_0, by the same arithmetic in torch.

Block layouts (ggml-common.h); each 4-bit layout below is w = u * scale + offset per 32 values, u in 0..15:
  Q8_0  34 bytes: fp16 d, 32 int8 q;                                        w = d * q
  Q4_0  18 bytes: fp16 d, 16 bytes (byte j: value j low nibble, j+16 high); w = d * (u - 8)
  Q4_1  20 bytes: fp16 d, fp16 m, 16 bytes as Q4_0;                         w = d * u + m
  Q4_K  144 bytes per 256 values: fp16 d, fp16 dmin, 12 bytes of eight 6-bit (scale, min) pairs, 128
        bytes (byte 32c + j: value 64c + j low nibble, 64c + 32 + j high);  w = (d * sc) * u - (dmin * m)
"""

from __future__ import annotations

import numpy as np
import torch

from shoal.errors import WeightError

BLOCK = 32  # values per Q8_0 / Q4_0 / Q4_1 block, and per Q4_K sub-block
Q8_0_BYTES = 2 + BLOCK
Q4_0_BYTES = 2 + BLOCK // 2
Q4_1_BYTES = 4 + BLOCK // 2
Q4_K_VALUES, Q4_K_BYTES = 256, 144
Q4_0_ZERO_POINT = 8
FLOAT_TYPES = ("F32", "F16", "BF16")
# The GGUF types that are exactly shoal's int4 group-32 format (int4_blocks).
INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")


def _blocks(data: np.ndarray, block_bytes: int, kind: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """uint8 [..., n_blocks * block_bytes] -> (uint8 [blocks, block_bytes], leading shape + (n_blocks,))."""
    if not isinstance(data, np.ndarray):
        raise WeightError(f"{kind} data must be a numpy array of bytes, got {type(data).__name__}")
    if data.dtype != np.uint8 or data.ndim < 1 or data.shape[-1] % block_bytes:
        raise WeightError(f"{kind} data must be uint8 rows of {block_bytes}-byte blocks, got {data.dtype} {data.shape}")
    lead = tuple(int(d) for d in data.shape[:-1])
    return np.ascontiguousarray(data).reshape(-1, block_bytes), lead + (data.shape[-1] // block_bytes,)


def _fp16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 stored at byte `at` of every block, as float32 [blocks]."""
    return np.ascontiguousarray(blocks[:, at : at + 2]).view(np.float16)[:, 0].astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 [blocks, 16] -> uint8 [blocks, 32]: the low nibbles (values 0..15), then the high ones (16..31)."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def q8_0_blocks(data: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 bytes [..., in/32*34] -> (int8 values [..., in], float16 scales [..., in/32]); w = scale * value."""
    blocks, shape = _blocks(data, Q8_0_BYTES, "Q8_0")
    blocks = torch.from_numpy(blocks.copy())
    scales = blocks[:, :2].contiguous().view(torch.float16).reshape(shape)
    values = blocks[:, 2:].contiguous().view(torch.int8).reshape(*shape[:-1], shape[-1] * BLOCK)
    return values, scales


def q4_0_blocks(data: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Q4_0 bytes [..., in/32*18] -> (uint8 values 0..15 [..., in], float16 scales [..., in/32], zero point 8).

    w = scale * (value - 8): exactly an int4 group-32 weight with a fixed zero point.
    """
    blocks, shape = _blocks(data, Q4_0_BYTES, "Q4_0")
    scales = torch.from_numpy(np.ascontiguousarray(blocks[:, :2]).view(np.float16).reshape(shape))
    values = torch.from_numpy(_nibbles(blocks[:, 2:]))
    return values.reshape(*shape[:-1], shape[-1] * BLOCK), scales, Q4_0_ZERO_POINT


def q4_1_blocks(data: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 bytes [..., in/32*20] -> (uint8 values [..., in], float32 scales and offsets [..., in/32]);
    w = value * scale + offset, evaluated as gguf.quants does it (so bit for bit the same)."""
    blocks, shape = _blocks(data, Q4_1_BYTES, "Q4_1")
    scales, offsets = _fp16(blocks, 0).reshape(shape), _fp16(blocks, 2).reshape(shape)
    values = _nibbles(blocks[:, 4:]).reshape(*shape[:-1], shape[-1] * BLOCK)
    return torch.from_numpy(values), torch.from_numpy(scales), torch.from_numpy(offsets)


def q4_k_blocks(data: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K bytes [..., in/256*144] -> (uint8 values [..., in], float32 scales and offsets [..., in/32]):
    each 32-value sub-block is one int4 group, scale d * sc and offset -(dmin * m), as gguf.quants computes."""
    blocks, shape = _blocks(data, Q4_K_BYTES, "Q4_K")
    n = blocks.shape[0]
    d, dmin = _fp16(blocks, 0)[:, None], _fp16(blocks, 2)[:, None]
    packed = blocks[:, 4:16].reshape(n, 3, 4)  # see gguf.quants.Q4_K.get_scale_min
    low, high, extra = packed[:, 0], packed[:, 1], packed[:, 2]
    sc = np.concatenate([low & 0x3F, (extra & 0x0F) | ((low >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([high & 0x3F, (extra >> 4) | ((high >> 2) & 0x30)], axis=-1)
    scales = d * sc.astype(np.float32)
    offsets = -(dmin * mins.astype(np.float32))
    qs = blocks[:, 16:].reshape(n, 4, 32)
    values = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n, Q4_K_VALUES)  # sub-blocks 2c, 2c + 1
    groups = shape[-1] * (Q4_K_VALUES // BLOCK)
    return (
        torch.from_numpy(values.reshape(*shape[:-1], shape[-1] * Q4_K_VALUES)),
        torch.from_numpy(scales.reshape(*shape[:-1], groups)),
        torch.from_numpy(offsets.reshape(*shape[:-1], groups)),
    )


def int4_blocks(type_name: str, data: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, int | None, torch.Tensor | None]:
    """A tensor of one of INT4_TYPES -> (values 0..15 [..., in], scales [..., in/32], zero point, offsets):
    w = (value - zero point) * scale (Q4_0), or value * scale + offset (Q4_1, Q4_K)."""
    if type_name == "Q4_0":
        values, scales, zero = q4_0_blocks(data)
        return values, scales, zero, None
    if type_name == "Q4_1":
        values, scales, offsets = q4_1_blocks(data)
    elif type_name == "Q4_K":
        values, scales, offsets = q4_k_blocks(data)
    else:
        raise WeightError(f"GGUF type {type_name} is not an int4 group-32 layout (only {', '.join(INT4_TYPES)} are)")
    return values, scales, None, offsets


def dequantize_q8_0(data: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    values, scales = q8_0_blocks(data)
    shape = values.shape
    w = values.view(-1, BLOCK).float() * scales.reshape(-1, 1).float()
    return w.reshape(shape).to(dtype)


def dequantize_q4_0(data: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    values, scales, zero = q4_0_blocks(data)
    shape = values.shape
    w = (values.view(-1, BLOCK).float() - zero) * scales.reshape(-1, 1).float()
    return w.reshape(shape).to(dtype)


def _dequantize_gguf(type_name: str, data: np.ndarray) -> torch.Tensor:
    """Any quantized type, by the gguf package's decoder, as float32 [..., in]."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType[type_name]
    _, block_bytes = GGML_QUANT_SIZES[qtype]
    _blocks(data, block_bytes, type_name)  # the same one-line error for a wrong size as the types above
    return torch.from_numpy(dequantize(np.ascontiguousarray(data), qtype))


def to_torch(type_name: str, data: np.ndarray, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
    """One tensor's mapped bytes -> a torch tensor of `shape` (row-major); quantized types are dequantized.

    Float types keep their own dtype unless `dtype` is given; quantized ones become `dtype` (float32 by default).
    """
    if type_name == "F32":
        out = torch.from_numpy(np.array(data, dtype=np.float32)).reshape(shape)
    elif type_name == "F16":
        out = torch.from_numpy(np.array(data, dtype=np.float16)).reshape(shape)
    elif type_name == "BF16":
        out = torch.from_numpy(np.ascontiguousarray(data).view(np.int16).copy()).view(torch.bfloat16).reshape(shape)
    elif type_name == "Q8_0":
        out = dequantize_q8_0(data, dtype or torch.float32).reshape(shape)
    elif type_name == "Q4_0":
        out = dequantize_q4_0(data, dtype or torch.float32).reshape(shape)
    else:
        out = _dequantize_gguf(type_name, data).reshape(shape)
    return out if dtype is None else out.to(dtype)
