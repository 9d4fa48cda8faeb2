"""Matmuls against quantized weights: the pure-torch fallback every device has. A backend hands one out
from `Backend.linear_fn(weight_format)`; one with faster kernels brings its own (the CPU's are in
shoal/backends/cpu/quantized.py).

A quantized layer keeps its weight as named tensors in the canonical layouts of shoal.quant.formats:
  "int8"  qweight int8 [out, in], scales [out]
  "int4"  qweight uint8 [out, in / 2] (low nibble first), scales and zeros [out, in / group]
  "fp8"   qweight float8_e4m3fn [out, in], scales float32 [out, ceil(in / 128)] (row-expanded blocks)
A kernel may re-lay them out once at load (`prepare`); after that only its own `matmul` reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn import functional as F


Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class QuantizedLinearKernel:
    """y = x W^T for one weight format on one device. x is 2-D [tokens, in]."""

    name: str
    matmul: Callable[[torch.Tensor, Tensors, int], torch.Tensor]
    # (canonical tensors, group size) -> tensors in this kernel's layout; None keeps the canonical layout.
    prepare: Callable[[Tensors, int], Tensors] | None = None

    def __call__(self, x: torch.Tensor, tensors: Tensors, group_size: int = 0) -> torch.Tensor:
        return self.matmul(x, tensors, group_size)


# ---- pure torch: correct on any device, dequantizes the weight on every call -------------------------
def dequantize_int4(tensors: Tensors, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    packed = tensors["qweight"]
    u = torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)
    out, n = u.shape
    grouped = u.view(out, n // group_size, group_size).to(torch.float32) - 8.0
    w = grouped * tensors["scales"].float()[..., None] + tensors["zeros"].float()[..., None]
    return w.view(out, n).to(dtype)


def dequantize_fp8(tensors: Tensors, dtype: torch.dtype) -> torch.Tensor:
    w = tensors["qweight"]
    scales = tensors["scales"].repeat_interleave(128, dim=-1)[:, : w.shape[-1]]
    return (w.to(torch.float32) * scales).to(dtype)


def int8_fallback(x: torch.Tensor, t: Tensors, group_size: int = 0) -> torch.Tensor:
    # Per-output-channel scales commute with the matmul: scale the [tokens, out] result instead of the
    # [out, in] weight. int8 values are exact in bf16 / fp16 / fp32.
    return F.linear(x, t["qweight"].to(x.dtype)) * t["scales"].to(x.dtype)


def int4_fallback(x: torch.Tensor, t: Tensors, group_size: int) -> torch.Tensor:
    return F.linear(x, dequantize_int4(t, group_size, x.dtype))


def fp8_fallback(x: torch.Tensor, t: Tensors, group_size: int = 0) -> torch.Tensor:
    return F.linear(x, dequantize_fp8(t, x.dtype))


FALLBACK_KERNELS = {
    "int8": QuantizedLinearKernel("int8-dequant", int8_fallback),
    "int4": QuantizedLinearKernel("int4-dequant", int4_fallback),
    "fp8": QuantizedLinearKernel("fp8-dequant", fp8_fallback),
}
