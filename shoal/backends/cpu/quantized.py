"""The CPU backend's matmuls against int8 and int4 weights (CpuBackend.linear_fn): shoal's own kernels
(gemv.c) where they run vectorized (AVX-512), aten's packed int8 / int4 kernels elsewhere and for the
shapes those take, and the dequantizing fallback (shoal/backends/quantized_matmul.py) for the rest.
"""

from __future__ import annotations

import functools

import torch

from shoal.backends.cpu import gemv
from shoal.backends.quantized_matmul import FALLBACK_KERNELS, QuantizedLinearKernel, Tensors, int4_fallback

# ---- CPU: shoal's matrix-vector kernels for decode, aten's packed kernels where those are absent ---------
# Measured on a 2-core AVX-512/AMX Xeon, bf16, one thread, [1024 -> 5632]
# (benchmarks/quant_memory_speed.py --kernels): at 1 token int8pack 0.56 ms and int4pack 0.45 ms
# against 1.35 ms for the bf16 matmul and 3.1 ms for dequantize-then-matmul; from ~16 tokens on
# both packed kernels fall behind (they are matrix-vector kernels: 12 ms at 64 tokens against 3.7 ms
# for int8 dequantize-then-matmul). In fp32 they are slower than the fallback at every size.
# shoal's own kernels (csrc/gemv.c) take up to 8 rows in float32 or bf16; above that, bf16 activations up
# to gemv.ROWS_MAX rows (a batched decode step) go to its matmul_rows_* kernels, which turn
# the weight into bf16 a tile at a time in cache; larger prefill chunks are a matmul on the CPU's matrix
# units against the weight dequantized to bf16.
INT8_PACKED_MAX_TOKENS = 8


def _gemv_here(use_gemv: bool | None) -> bool:
    """Whether shoal's kernels multiply (None: the "auto" choice, gemv.chosen)."""
    return gemv.chosen() if use_gemv is None else use_gemv and gemv.available()


def int8_cpu_prepare(t: Tensors, group_size: int, use_gemv: bool | None = None) -> Tensors:
    """Float32 scales for shoal's kernels (their presence is what int8_cpu dispatches on); else as it is."""
    if not _gemv_here(use_gemv):
        return t
    return {**t, "scales_f32": t["scales"].to(torch.float32).contiguous()}


def int8_cpu(x: torch.Tensor, t: Tensors, group_size: int = 0) -> torch.Tensor:
    if "scales_f32" in t and gemv.accepts(x, t["qweight"].shape[1]):
        return gemv.gemv_int8(x, t["qweight"], t["scales_f32"])
    if "scales_f32" in t and gemv.rows_kernel_takes(x, t["qweight"].shape[1], "int8"):
        return gemv.matmul_rows_int8(x, t["qweight"], t["scales_f32"])
    if x.dtype == torch.bfloat16 and x.shape[0] <= INT8_PACKED_MAX_TOKENS:
        return torch.ops.aten._weight_int8pack_mm(x.contiguous(), t["qweight"], t["scales"])
    return gemv.linear_in_buckets(x, t["qweight"].to(x.dtype)) * t["scales"].to(x.dtype)


def int4_cpu_prepare(t: Tensors, group_size: int, use_gemv: bool | None = None) -> Tensors:
    """Re-lay an int4 weight for shoal's kernel, else (bf16 scales only) for aten._weight_int4pack_mm_for_cpu;
    a shape neither takes keeps the canonical layout and the fallback."""
    packed = t["qweight"]
    out, k = packed.shape[0], packed.shape[1] * 2
    if _gemv_here(use_gemv) and gemv.int4_layout_fits(k, group_size):
        return gemv.int4_relayout(packed, t["scales"], t["zeros"])
    if t["scales"].dtype != torch.bfloat16 or out % 16 or group_size not in (32, 64, 128, 256):
        return t
    u = torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2).to(torch.int32)
    return {
        "qweight_cpu": torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), 1),
        "scales_and_zeros": torch.stack([t["scales"], t["zeros"]], dim=-1).transpose(0, 1).contiguous(),
    }


def int4_cpu(x: torch.Tensor, t: Tensors, group_size: int) -> torch.Tensor:
    if "qweight_gemv" in t:
        if gemv.accepts(x, t["qweight_gemv"].shape[1] * 2):
            return gemv.gemv_int4(x, t, group_size)
        if gemv.rows_kernel_takes(x, t["qweight_gemv"].shape[1] * 2, "int4"):
            return gemv.matmul_rows_int4(x, t, group_size)
        w = gemv.dequantize_int4(t, group_size, x.dtype)
        return gemv.linear_in_buckets(x.to(w.dtype), w).to(x.dtype)
    if "qweight_cpu" not in t:
        return int4_fallback(x, t, group_size)
    # The kernel reads a bf16 activation; other dtypes are only reached by a caller that skipped prepare.
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.to(torch.bfloat16).contiguous(), t["qweight_cpu"], group_size, t["scales_and_zeros"]
    )
    return y.to(x.dtype)


def cpu_kernels(use_gemv: bool | None = None) -> dict[str, QuantizedLinearKernel]:
    """The CPU's kernel per weight format; use_gemv: whether shoal's kernels multiply (None: where they run
    vectorized). Each weight's layout after `prepare` says which kernel `matmul` then runs."""
    return {
        "int8": QuantizedLinearKernel("int8-gemv", int8_cpu, functools.partial(int8_cpu_prepare, use_gemv=use_gemv)),
        "int4": QuantizedLinearKernel("int4-gemv", int4_cpu, functools.partial(int4_cpu_prepare, use_gemv=use_gemv)),
        "fp8": FALLBACK_KERNELS["fp8"],
    }


CPU_KERNELS = cpu_kernels()
