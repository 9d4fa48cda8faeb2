"""shoal's own matrix-vector kernels for the CPU (cpu_gemv.c): decode-time y = x W^T for up to 8
activation rows, with W in bf16, int8 or int4, streamed at close to the memory's bandwidth.

aten's CPU kernels for one row read weights well below the bandwidth on the machines we measured
(bf16 torch.mv ~22 GB/s, the packed int8 / int4 kernels ~9 GB/s, against ~27 GB/s that a plain copy
reaches on 2 cores), and batch-1 decode is nothing but weight reads. The C file is built at first use
by cpu_build.py.

Where no compiler is found, or SHOAL_CPU_KERNELS=0, `library()` is None and every caller keeps
aten's kernels: the engine runs the same, only slower.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from shoal.backends.cpu_build import ALL_KERNELS_SWITCH, load, switched_off

SOURCE = Path(__file__).with_name("cpu_gemv.c")
MAX_ROWS = 8  # activation rows per call (MAX_ROWS in cpu_gemv.c)
ENV_SWITCH = ALL_KERNELS_SWITCH


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built here (the reason is logged once)."""
    if switched_off():
        return None
    lib = load(SOURCE, "matrix-vector kernels")
    if lib is None:
        return None
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.shoal_gemv_bf16.argtypes = [ptr, i32, i64, i64, ptr, i64, ptr, i32]
    lib.shoal_gemv_int8.argtypes = [ptr, i32, i64, i64, ptr, ptr, i64, ptr, i32]
    lib.shoal_gemv_int4.argtypes = [ptr, i32, i64, i64, ptr, ptr, ptr, i32, i64, i64, ptr, i32]
    lib.shoal_dequant_int4.argtypes = [ptr, ptr, ptr, i32, i64, i64, i64, ptr, i32, i32]
    lib.shoal_kernel_features.argtypes = []
    for fn in (lib.shoal_kernel_features, lib.shoal_gemv_bf16, lib.shoal_gemv_int8, lib.shoal_gemv_int4, lib.shoal_dequant_int4):
        fn.restype = i32
    return lib


def available() -> bool:
    return library() is not None


def quantizes_activations() -> bool:
    """Whether int8 / int4 weights multiply bf16 activations quantized to int8 (one scale per 32 inputs,
    with VNNI, as llama.cpp does) rather than as given. float32 activations are always used as given."""
    lib = library()
    return lib is not None and bool(lib.shoal_kernel_features() & 1)


def accepts(x: torch.Tensor, in_features: int) -> bool:
    """Whether the kernels take this activation: 2-D [rows <= 8, in], float32 or bf16, on the CPU."""
    return (
        x.dim() == 2
        and 1 <= x.shape[0] <= MAX_ROWS
        and x.shape[1] == in_features
        and in_features % 16 == 0
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.device.type == "cpu"
    )


def _check(code: int, name: str) -> None:
    if code != 0:
        raise RuntimeError(f"shoal CPU kernel {name} rejected its arguments (code {code}); this is a bug in shoal")


def gemv_bf16(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] (float32 or bf16) times a bf16 weight [N, K]: [M, N] in x's dtype."""
    x = x.contiguous()
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype)
    _check(library().shoal_gemv_bf16(
        x.data_ptr(), int(x.dtype == torch.bfloat16), m, k, weight.data_ptr(), n, y.data_ptr(), torch.get_num_threads()
    ), "gemv_bf16")
    return y


def gemv_int8(x: torch.Tensor, qweight: torch.Tensor, scales_f32: torch.Tensor) -> torch.Tensor:
    """x [M, K] times int8 [N, K] with float32 per-row scales [N]."""
    x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype)
    _check(library().shoal_gemv_int8(
        x.data_ptr(), int(x.dtype == torch.bfloat16), m, k, qweight.data_ptr(), scales_f32.data_ptr(), n,
        y.data_ptr(), torch.get_num_threads(),
    ), "gemv_int8")
    return y


def int4_layout_fits(in_features: int, group_size: int) -> bool:
    """The int4 kernel's shapes: 128-input blocks, and a power-of-two group of 32 or more."""
    return in_features % 128 == 0 and group_size >= 32 and group_size & (group_size - 1) == 0 and in_features % group_size == 0


def int4_relayout(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> dict[str, torch.Tensor]:
    """shoal's canonical int4 (input 2j in the low nibble, 2j + 1 in the high one) as the kernel's layout:
    per 128 inputs 64 bytes, byte i = input i (low nibble) | input 64 + i (high). Scales and zeros keep
    their dtype (bf16 or float32; others become float32)."""
    u = torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)  # [N, K] uint4 values
    n, k = u.shape
    blocks = u.view(n, k // 128, 2, 64)
    relaid = (blocks[:, :, 0, :] | (blocks[:, :, 1, :] << 4)).reshape(n, k // 2).contiguous()
    dtype = scales.dtype if scales.dtype in (torch.bfloat16, torch.float32) else torch.float32
    return {
        "qweight_gemv": relaid,
        "scales": scales.to(dtype).contiguous(),
        "zeros": zeros.to(dtype).contiguous(),
    }


def gemv_int4(x: torch.Tensor, t: dict[str, torch.Tensor], group_size: int) -> torch.Tensor:
    x = x.contiguous()
    m, k = x.shape
    n = t["qweight_gemv"].shape[0]
    y = torch.empty(m, n, dtype=x.dtype)
    _check(library().shoal_gemv_int4(
        x.data_ptr(), int(x.dtype == torch.bfloat16), m, k, t["qweight_gemv"].data_ptr(), t["scales"].data_ptr(),
        t["zeros"].data_ptr(), int(t["scales"].dtype == torch.bfloat16), group_size, n, y.data_ptr(),
        torch.get_num_threads(),
    ), "gemv_int4")
    return y


def dequantize_int4(t: dict[str, torch.Tensor], group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The kernel-layout int4 weight as bf16 or float32 [N, K] (for prefill's matmul)."""
    q = t["qweight_gemv"]
    n, k = q.shape[0], q.shape[1] * 2
    out = torch.empty(n, k, dtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    _check(library().shoal_dequant_int4(
        q.data_ptr(), t["scales"].data_ptr(), t["zeros"].data_ptr(), int(t["scales"].dtype == torch.bfloat16),
        group_size, n, k, out.data_ptr(), int(out.dtype == torch.bfloat16), torch.get_num_threads(),
    ), "dequant_int4")
    return out
