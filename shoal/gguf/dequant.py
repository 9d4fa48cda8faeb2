"""GGUF tensor bytes -> torch: float types as they are, and Q8_0 / Q4_0 either dequantized or as their
raw 32-element blocks (integer values plus one fp16 scale per block), the layout shoal's int8 and
group-32 int4 weight formats take without passing through a full-precision copy.

Block layouts (ggml-common.h):
  Q8_0  34 bytes: fp16 scale d, then 32 int8 q;                       w = d * q
  Q4_0  18 bytes: fp16 scale d, then 16 bytes; byte j holds element j
        in its low nibble and element j + 16 in its high nibble;      w = d * (q - 8)
"""

from __future__ import annotations

import numpy as np
import torch

from shoal.errors import WeightError

BLOCK = 32  # elements per Q8_0 / Q4_0 block
Q8_0_BYTES = 2 + BLOCK
Q4_0_BYTES = 2 + BLOCK // 2
Q4_0_ZERO_POINT = 8


def _blocks(data: np.ndarray, block_bytes: int, kind: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    """uint8 [..., n_blocks * block_bytes] -> (uint8 tensor [elements // 32, block_bytes], leading shape)."""
    if not isinstance(data, np.ndarray):  # a gguf ReaderTensor
        data = data.data
    if data.dtype != np.uint8 or data.ndim < 1 or data.shape[-1] % block_bytes:
        raise WeightError(f"{kind} data must be uint8 rows of {block_bytes}-byte blocks, got {data.dtype} {data.shape}")
    lead = tuple(int(d) for d in data.shape[:-1])
    blocks = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, block_bytes).copy())
    return blocks, lead + (data.shape[-1] // block_bytes,)


def q8_0_blocks(data: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 bytes [..., in/32*34] -> (int8 values [..., in], float16 scales [..., in/32]); w = scale * value."""
    blocks, shape = _blocks(data, Q8_0_BYTES, "Q8_0")
    scales = blocks[:, :2].contiguous().view(torch.float16).reshape(shape)
    values = blocks[:, 2:].contiguous().view(torch.int8).reshape(*shape[:-1], shape[-1] * BLOCK)
    return values, scales


def q4_0_blocks(data: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Q4_0 bytes [..., in/32*18] -> (uint8 values 0..15 [..., in], float16 scales [..., in/32], zero point 8).

    w = scale * (value - 8): exactly an int4 group-32 weight with a fixed zero point.
    """
    blocks, shape = _blocks(data, Q4_0_BYTES, "Q4_0")
    scales = blocks[:, :2].contiguous().view(torch.float16).reshape(shape)
    packed = blocks[:, 2:]
    values = torch.cat([packed & 0x0F, packed >> 4], dim=1)  # elements 0..15, then 16..31
    return values.reshape(*shape[:-1], shape[-1] * BLOCK), scales, Q4_0_ZERO_POINT


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
    else:  # GGUFFile refuses other types when it opens the file
        raise WeightError(f"cannot read GGUF tensors of type {type_name}")
    return out if dtype is None else out.to(dtype)
