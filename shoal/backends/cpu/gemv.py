"""shoal's own matrix-vector kernels for the CPU (csrc/gemv.c): decode-time y = x W^T for up to 8
activation rows, with W in bf16, int8 or int4, streamed at close to the memory's bandwidth.

aten's CPU kernels for one row read weights well below the bandwidth on the machines we measured
(bf16 torch.mv ~22 GB/s, the packed int8 / int4 kernels ~9 GB/s, against ~27 GB/s that a plain copy
reaches on 2 cores), and batch-1 decode is nothing but weight reads. The C file is built at first use
by cpu/build.py.

For a batched decode step (9 to ROWS_MAX bf16 rows) the matmul_rows_* kernels take over: there the
multiplies set the pace, and they run on AMX tiles (or AVX512-BF16 dot products) against the weight
turned into bf16 a tile at a time in cache, instead of dequantizing the whole weight into memory for
F.linear on every call; int4 weights on a CPU without AMX multiply int8-quantized activations with integer
dot products instead (csrc/rows_q8.c), on every vectorized ISA. SHOAL_CPU_ROWS=0 switches them off alone.

Where no compiler is found, or SHOAL_CPU_KERNELS=0, `library()` is None and every caller keeps
aten's kernels: the engine runs the same, only slower.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from shoal.backends.cpu.build import ALL_KERNELS_SWITCH, switched_off
from shoal.backends.cpu.capture import call
from shoal.backends.cpu.library import kernels

MAX_ROWS = 8  # activation rows per call (MAX_ROWS in csrc/gemv.c)
ENV_SWITCH = ALL_KERNELS_SWITCH
ROWS_ENV_SWITCH = "SHOAL_CPU_ROWS"  # =0: no matmul_rows_* kernels (batched decode keeps dequantize + matmul)
# Activation rows up to which matmul_rows_* replace the matmul (above MAX_ROWS). Measured ad hoc on a
# 2-core AMX Xeon, 2 threads: the 0.5B Llama's weight shapes summed over a decode step (32 layers and the
# int8 / bf16 output head), best of 7 calls, against dequantize-to-bf16 + F.linear (int4 group 32, int8)
# and F.linear (bf16):
#   rows             9    16    32    64   128
#   int4  ms        46    48    53    59    86   against 129 134 135 132 214
#   int8  ms        49    56    70   110   163   against 174 186 209 249 317
#   bf16  ms        38    37    47    64   106   against  47  47  55  81 121
# With the weights read from memory rather than cache (many copies of one [5632, 1024] weight) bf16 was
# 1.5x F.linear from 9 to 64 rows. At 256 rows (1 thread) the kernels were still ahead, 1.8x for int4 and
# 1.1x for bf16, but from there on the rows are a prefill chunk, which keeps the matmul.
ROWS_MAX = 128
# Without AMX the kernels multiply with AVX512-BF16 dot products. With oneDNN limited to AVX512_CORE_BF16
# on the same machine (1 thread) they beat dequantize + F.linear for int4 / int8 up to 64 rows (399
# against 554 ms at 32, 819 against 978 at 64) but only tie it at 128, and only tie F.linear for bf16
# weights at any size: there bf16 weights keep F.linear and int8 / int4 stop at 64 rows.
ROWS_MAX_WITHOUT_AMX = 64
# int4 weights without AMX multiply with csrc/rows_q8.c's integer kernel up to the same 64 rows. Alone it
# was faster at every size tried on a Zen 4 (2 threads, ad hoc, [1024 -> 2816] and [2816 -> 1024] weights,
# 4 copies: 410-470 GFLOP/s from 16 to 512 rows, against 165-404 for dequantize + F.linear), but sending a
# prefill chunk to it made an offline 32-prompt run slower (197 against 224 tok/s, 128-token prompts): its
# per-row activation layout and scalar output stores cost more at thousands of rows; not yet tuned for that.


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernels (library.py), or None where they cannot be built here (the reason is logged
    once) or SHOAL_CPU_KERNELS=0."""
    return None if switched_off() else kernels()


def available() -> bool:
    return library() is not None


def quantizes_activations() -> bool:
    """Whether int8 / int4 weights multiply bf16 activations quantized to int8 (one scale per 32 inputs,
    as llama.cpp does) rather than as given: wherever the kernels are built, on every ISA. float32
    activations are always used as given."""
    lib = library()
    return lib is not None and bool(lib.features & 1)


def lanes() -> str:
    """The registers the dot products' 16 lanes (csrc/lanes.h) live in here: "avx512", "avx2", "neon" or
    "portable" (plain C), or "none" where the kernels are not built."""
    lib = library()
    if lib is None:
        return "none"
    return "avx512" if lib.features & 16 else "avx2" if lib.features & 32 else "neon" if lib.features & 64 else "portable"


def vectorized() -> bool:
    """Whether the matrix-vector kernels run vectorized here (AVX-512, AVX2 or NEON lanes). Without them they are
    the portable C loops, several times slower than aten's kernels (`python benchmarks/quant_memory_speed.py
    --kernels --threads 2` on an AVX2-only AMD EPYC before the AVX2 lanes existed, one [1024 -> 5632]
    matmul of one bf16 row: bf16 5.12 ms against F.linear's 0.84, int8 3.29 against
    aten._weight_int8pack_mm's 0.73, int4 2.74 against _weight_int4pack_mm_for_cpu's 0.54), so the CPU
    backend multiplies with aten's there (cpu/ops.py, quantized.py) and keeps these for testing."""
    return lanes() in ("avx512", "avx2", "neon")


def chosen(kernels: str = "auto") -> bool:
    """Whether a model built with this EngineConfig.cpu_kernels choice multiplies with these kernels:
    "shoal" wherever they are built, "auto" where they run vectorized, "torch" never."""
    return available() and (kernels == "shoal" or (kernels == "auto" and vectorized()))


def rows_kernels_available() -> bool:
    """Whether the matmul_rows_* kernels (bf16 activations, more rows than the matrix-vector kernels take)
    run here: they need AVX512-BF16 (or NEON: csrc/arm/matmul_rows.c), and SHOAL_CPU_ROWS=0 switches them off
    (callers keep the matmul)."""
    lib = library()
    return lib is not None and bool(lib.features & 4) and not switched_off(ROWS_ENV_SWITCH)


def rows_int4_available() -> bool:
    """Whether shoal_matmul_rows_int4 runs here: the kernels above, or (without them, and wherever AMX is
    not used) the integer kernel of csrc/rows_q8.c, which every vectorized ISA level runs."""
    lib = library()
    return lib is not None and bool(lib.features & (4 | 256)) and not switched_off(ROWS_ENV_SWITCH)


def rows_use_amx() -> bool:
    """Whether matmul_rows_* multiply on AMX tiles (else with AVX512-BF16 dot products)."""
    lib = library()
    return lib is not None and bool(lib.features & 8)


def rows_kernel_takes(x: torch.Tensor, in_features: int, weight_format: str) -> bool:
    """Whether matmul_rows_* should multiply this activation, against a weight in `weight_format` ("bf16",
    "int8" or "int4"): 2-D bf16 [rows, in] on the CPU with more rows than the matrix-vector kernels take
    and at most ROWS_MAX (ROWS_MAX_WITHOUT_AMX for int8 / int4 without AMX, where bf16 weights keep
    F.linear): where the kernels measured faster than the matmul they replace."""
    if not (x.dim() == 2 and x.dtype == torch.bfloat16 and x.shape[1] == in_features and x.device.type == "cpu"):
        return False
    if not MAX_ROWS < x.shape[0] <= ROWS_MAX:
        return False
    if not (rows_int4_available() if weight_format == "int4" else rows_kernels_available()):
        return False
    return rows_use_amx() or (weight_format != "bf16" and x.shape[0] <= ROWS_MAX_WITHOUT_AMX)


# A matmul's rows are rounded up to a multiple of this (with zero rows) for bf16 / fp16 on the CPU: oneDNN
# builds and caches a kernel for every new row count, and a step of continuous batching has a new token
# count nearly every step. Measured ad hoc (1 thread, [rows, 512] x [2816, 512]^T bf16): a new row count's
# first call took 1.7-2.5 ms against 0.7-0.9 ms for the next; in float32 the difference was within noise.
ROW_BUCKET = 32


def linear_in_buckets(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with a bf16 / fp16 activation's rows on the CPU padded to a multiple of ROW_BUCKET (the
    padding's outputs are dropped; each real row's output does not depend on the others)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    padded = -(-rows // ROW_BUCKET) * ROW_BUCKET
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16) or padded == rows:
        return torch.nn.functional.linear(x, weight, bias)
    flat = x.new_zeros(padded, x.shape[-1])
    flat[:rows] = x.reshape(rows, x.shape[-1])
    y = torch.nn.functional.linear(flat, weight, bias)[:rows]
    return y.view(*x.shape[:-1], y.shape[-1])


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
    if code == 2:  # the kernels' "out of memory" (their scratch buffers)
        raise MemoryError(f"shoal CPU kernel {name} could not allocate its scratch memory; free memory (e.g. a "
                          "smaller --kv-cache-memory or --max-num-seqs) and retry")
    if code != 0:
        raise RuntimeError(f"shoal CPU kernel {name} rejected its arguments (code {code}); this is a bug in shoal")


def gemv_bf16(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] (float32 or bf16) times a bf16 weight [N, K]: [M, N] in x's dtype."""
    x = x.contiguous()
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype)
    lib = library()
    _check(call(lib.shoal_gemv_bf16, "shoal_gemv_bf16",
                x.data_ptr(), int(x.dtype == torch.bfloat16), m, k, weight.data_ptr(), n, y.data_ptr(),
                torch.get_num_threads(), keep=(x, weight, y)), "gemv_bf16")
    return y


def gemv_int8(x: torch.Tensor, qweight: torch.Tensor, scales_f32: torch.Tensor) -> torch.Tensor:
    """x [M, K] times int8 [N, K] with float32 per-row scales [N]."""
    x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype)
    lib = library()
    _check(call(lib.shoal_gemv_int8, "shoal_gemv_int8",
                x.data_ptr(), int(x.dtype == torch.bfloat16), m, k, qweight.data_ptr(), scales_f32.data_ptr(), n,
                y.data_ptr(), torch.get_num_threads(), keep=(x, qweight, scales_f32, y)), "gemv_int8")
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
    lib = library()
    _check(call(lib.shoal_gemv_int4, "shoal_gemv_int4",
                x.data_ptr(), int(x.dtype == torch.bfloat16), m, k, t["qweight_gemv"].data_ptr(),
                t["scales"].data_ptr(), t["zeros"].data_ptr(), int(t["scales"].dtype == torch.bfloat16), group_size, n,
                y.data_ptr(), torch.get_num_threads(), keep=(x, *t.values(), y)), "gemv_int4")
    return y


def dequantize_int4(t: dict[str, torch.Tensor], group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The kernel-layout int4 weight as bf16 or float32 [N, K] (for prefill's matmul)."""
    q = t["qweight_gemv"]
    n, k = q.shape[0], q.shape[1] * 2
    out = torch.empty(n, k, dtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    lib = library()
    _check(call(lib.shoal_dequant_int4, "shoal_dequant_int4",
                q.data_ptr(), t["scales"].data_ptr(), t["zeros"].data_ptr(), int(t["scales"].dtype == torch.bfloat16),
                group_size, n, k, out.data_ptr(), int(out.dtype == torch.bfloat16), torch.get_num_threads()),
           "dequant_int4")
    return out


# ---- more rows (batched decode): shoal_matmul_rows_* ------------------------------------------------
def _rows_call(name: str, x: torch.Tensor, n: int, amx: bool | None, *args, keep=()) -> torch.Tensor:
    if x.dtype != torch.bfloat16 or x.dim() != 2:
        raise ValueError(f"{name} takes 2-D bf16 activations, got {x.dtype} {tuple(x.shape)}; "
                         "convert them with .to(torch.bfloat16) or use F.linear")
    x = x.contiguous()
    m, k = x.shape
    y = torch.empty(m, n, dtype=torch.bfloat16)
    use_amx = rows_use_amx() if amx is None else amx
    code = call(getattr(library(), f"shoal_{name}"), f"shoal_{name}", x.data_ptr(), m, k, *args, y.data_ptr(),
                int(use_amx), torch.get_num_threads(), keep=(x, y, *keep))
    if code == 3:
        raise RuntimeError(f"shoal CPU kernel {name} needs AVX512-BF16 (or NEON), which this CPU or build lacks; "
                           "check cpu_gemv.rows_kernels_available() before calling it")
    _check(code, name)
    return y


def matmul_rows_bf16(x: torch.Tensor, weight: torch.Tensor, amx: bool | None = None) -> torch.Tensor:
    """bf16 x [M, K] times a bf16 weight [N, K]: bf16 [M, N], as F.linear rounds it. amx=False keeps to
    AVX512-BF16 dot products where AMX is there (None: AMX where it is)."""
    weight = weight.contiguous()
    n = weight.shape[0]
    return _rows_call("matmul_rows_bf16", x, n, amx, weight.data_ptr(), n, keep=(weight,))


def matmul_rows_int8(x: torch.Tensor, qweight: torch.Tensor, scales_f32: torch.Tensor,
                     amx: bool | None = None) -> torch.Tensor:
    """bf16 x [M, K] times int8 [N, K] with float32 per-row scales [N]: bf16(bf16(x q^T) * scale)."""
    n = qweight.shape[0]
    return _rows_call("matmul_rows_int8", x, n, amx, qweight.data_ptr(), scales_f32.data_ptr(), n,
                      keep=(qweight, scales_f32))


def matmul_rows_int4(x: torch.Tensor, t: dict[str, torch.Tensor], group_size: int,
                     amx: bool | None = None) -> torch.Tensor:
    """bf16 x [M, K] times a kernel-layout int4 weight (int4_relayout): x W^T with W as dequantize_int4
    gives it in bf16."""
    n = t["qweight_gemv"].shape[0]
    return _rows_call("matmul_rows_int4", x, n, amx, t["qweight_gemv"].data_ptr(), t["scales"].data_ptr(),
                      t["zeros"].data_ptr(), int(t["scales"].dtype == torch.bfloat16), group_size, n,
                      keep=tuple(t.values()))


def matmul_rows_q8_int4(x: torch.Tensor, t: dict[str, torch.Tensor], group_size: int) -> torch.Tensor:
    """bf16 x [M, K] times a kernel-layout int4 weight with x quantized to int8 per block of 32 (as the
    matrix-vector kernels quantize it) and integer dot products: the batched path without AMX."""
    x = x.contiguous()
    m, k = x.shape
    n = t["qweight_gemv"].shape[0]
    y = torch.empty(m, n, dtype=torch.bfloat16)
    _check(call(library().shoal_matmul_rows_q8_int4, "shoal_matmul_rows_q8_int4", x.data_ptr(), m, k,
                t["qweight_gemv"].data_ptr(), t["scales"].data_ptr(), t["zeros"].data_ptr(),
                int(t["scales"].dtype == torch.bfloat16), group_size, n, y.data_ptr(), torch.get_num_threads(),
                keep=(x, y, *t.values())), "matmul_rows_q8_int4")
    return y
