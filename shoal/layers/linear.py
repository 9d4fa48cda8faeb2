"""Linear layers that know how their weights load: plain, and merged (several checkpoint matrices
stored as one, e.g. q/k/v or gate/up, so one matmul reads them all).

Quantized and tensor-parallel variants replace these classes without touching model code; the
model only says which checkpoint names map to which slice (see `MergedLinear.shard_names`).
"""

from __future__ import annotations

import torch
from torch import nn

from shoal.backends.cpu import gemv as cpu_gemv
from shoal.backends.cpu.packed_f32 import PackedF32
from shoal.errors import WeightError


def copy_weight(param: torch.Tensor, loaded: torch.Tensor, name: str) -> None:
    """Copy a checkpoint tensor into a parameter, converting dtype, after checking the shape.

    `loaded` may be a quantized weight (shoal.quant.formats) arriving at a full-precision parameter:
    it is dequantized first (an fp8 checkpoint on a device without fp8, MLA's kv_b_proj).
    """
    if not isinstance(loaded, torch.Tensor):
        loaded_shape = tuple(loaded.shape)
        if loaded_shape == tuple(param.shape):
            loaded = loaded.dequantize(torch.float32)
    if tuple(param.shape) != tuple(loaded.shape):
        raise WeightError(
            f"weight {name} has shape {tuple(loaded.shape)} in the checkpoint but the model expects "
            f"{tuple(param.shape)}; config.json and the weights disagree"
        )
    with torch.no_grad():
        param.copy_(loaded)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed_f32: PackedF32 | None = None) -> torch.Tensor:
    """F.linear, except: float32 rows on the CPU multiply with `packed_f32`, the weight packed once for
    MKL (shoal/backends/cpu/packed_f32.py), where the caller has one; and for a few bf16 / fp16 rows on
    the CPU - decode - a matrix-vector kernel
    reads the weight faster than F.linear's matmul: shoal's own (shoal/backends/cpu/csrc/gemv.c) for bf16
    weights where it could be built, else aten's torch.mv for a single row (one [5632, 1024] bf16
    weight, 2 threads: 531 against 836 us for F.linear). A batched decode step of bf16 rows, up to
    cpu_gemv.ROWS_MAX, goes to shoal's AMX kernel (cpu_gemv.matmul_rows_bf16) where the CPU has AMX; other
    bf16 / fp16 rows to F.linear with their count rounded up (cpu_gemv.linear_in_buckets)."""
    if packed_f32 is not None and packed_f32.takes(x, weight):
        return packed_f32(x, bias)
    if x.is_cpu and x.dtype in (torch.bfloat16, torch.float16) and x.shape[-1] == weight.shape[1]:
        rows = x.numel() // weight.shape[1]
        if weight.dtype == torch.bfloat16 and 1 <= rows <= cpu_gemv.MAX_ROWS and cpu_gemv.available():
            y = cpu_gemv.gemv_bf16(x.reshape(rows, weight.shape[1]).to(torch.bfloat16), weight)
            y = y.view(*x.shape[:-1], weight.shape[0]).to(x.dtype)
            return y if bias is None else y + bias
        if weight.dtype == torch.bfloat16 and x.dtype == torch.bfloat16 and cpu_gemv.available():
            flat = x.reshape(rows, weight.shape[1])
            if cpu_gemv.rows_kernel_takes(flat, weight.shape[1], "bf16"):
                y = cpu_gemv.matmul_rows_bf16(flat, weight).view(*x.shape[:-1], weight.shape[0])
                return y if bias is None else y + bias
        if rows == 1:
            y = torch.mv(weight, x.reshape(-1)).view(*x.shape[:-1], weight.shape[0])
            return y if bias is None else y + bias
        return cpu_gemv.linear_in_buckets(x, weight, bias)
    return nn.functional.linear(x, weight, bias)


class Linear(nn.Module):
    """y = x W^T (+ b), with W stored [out_features, in_features] as in Hugging Face checkpoints.
    `packed_f32`: a float32 weight's copy packed for MKL, set after loading (cpu_packed_f32.pack_model)."""

    packed_f32: PackedF32 | None = None

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # torch.empty: every value is overwritten by the loader, so spend no time initialising.
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed_f32)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dimension.

    `shard_names` are the checkpoint names of the parts in order (e.g. ("q_proj", "k_proj", "v_proj"));
    the loader calls `load_shard` once per part.
    """

    def __init__(self, in_features: int, out_sizes: list[int], shard_names: tuple[str, ...], bias: bool = False):
        super().__init__(in_features, sum(out_sizes), bias)
        self.out_sizes = list(out_sizes)
        self.shard_names = shard_names
        offsets = [0]
        for size in out_sizes:
            offsets.append(offsets[-1] + size)
        self._offsets = offsets

    def load_shard(self, param_name: str, shard: str, loaded: torch.Tensor, full_name: str) -> None:
        index = self.shard_names.index(shard)
        start, end = self._offsets[index], self._offsets[index + 1]
        target = getattr(self, param_name)
        copy_weight(target[start:end], loaded, full_name)

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(y, self.out_sizes, dim=-1))
