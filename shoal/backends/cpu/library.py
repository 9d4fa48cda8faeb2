"""shoal's CPU kernels as one library: the C sources under csrc/ built together (build.py) and every
exported function typed for ctypes here, once, as shoal_cpu.h declares it.

The modules that call the kernels (gemv.py, fused.py, experts.py, capture.py) each ask `kernels()` for the
library through their own `library()`, which is None where their switch turns them off.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

from shoal.backends.cpu import isa
from shoal.backends.cpu.build import load, switched_off

CSRC = Path(__file__).parent / "csrc"
# Portable C (with ISA-specific inner loops under #ifdef) and the batched-decode kernels written for one
# architecture: x86/ on x86-64, arm/ on aarch64, generic/ (entry points that answer "not on this CPU")
# elsewhere.
ISA_DIRS = {"x86": "x86", "arm": "arm", "other": "generic"}
PORTABLE_SOURCES = tuple(CSRC / name for name in ("gemv.c", "rows_q8.c", "fused.c", "experts.c", "replay.c"))


def sources(machine: str | None = None) -> tuple[Path, ...]:
    """The C files built into the library on `machine` (default: this host's platform.machine())."""
    return (*PORTABLE_SOURCES, CSRC / ISA_DIRS[isa.arch(machine)] / "matmul_rows.c")


SOURCES = sources()

_i64, _p, _i32, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float

# name -> argument types; every function returns int unless listed in _VOID
SIGNATURES: dict[str, list] = {
    # gemv.c
    "shoal_gemv_bf16": [_p, _i32, _i64, _i64, _p, _i64, _p, _i32],
    "shoal_gemv_int8": [_p, _i32, _i64, _i64, _p, _p, _i64, _p, _i32],
    "shoal_gemv_int4": [_p, _i32, _i64, _i64, _p, _p, _p, _i32, _i64, _i64, _p, _i32],
    "shoal_dequant_int4": [_p, _p, _p, _i32, _i64, _i64, _i64, _p, _i32, _i32],
    "shoal_matmul_rows_bf16": [_p, _i64, _i64, _p, _i64, _p, _i32, _i32],
    "shoal_matmul_rows_int8": [_p, _i64, _i64, _p, _p, _i64, _p, _i32, _i32],
    "shoal_matmul_rows_int4": [_p, _i64, _i64, _p, _p, _p, _i32, _i64, _i64, _p, _i32, _i32],
    "shoal_stream_read": [_p, _i64, _p, _i32],
    # rows_q8.c
    "shoal_matmul_rows_q8_int4": [_p, _i64, _i64, _p, _p, _p, _i32, _i64, _i64, _p, _i32],
    "shoal_kernel_features": [],
    "shoal_rows_features": [],
    # fused.c
    "shoal_rms_norm": [_p, _p, _p, _p, _p, _i64, _i64, _f32, _i32, _i32],
    "shoal_silu_mul": [_p, _p, _i64, _i64, _i32, _i32],
    "shoal_head_rms_norm": [_p, _i64, _i64, _i64, _i64, _p, _f32, _p, _i32, _i32],
    "shoal_add": [_p, _p, _p, _i64, _i64, _i64, _i32, _i32],
    "shoal_decode_attention": [_p, _i64, _p, _i64, _p, _i64, _i64, _i64, _i64, _i64, _p, _p, _p, _p, _p, _p, _p, _i64,
                               _p, _i64, _f32, _p, _i32, _i32],
    "shoal_mla_decode_attention": [_p, _i64, _p, _i64, _p, _f32, _p, _i64, _i64, _i64, _i64, _i64, _i64, _p, _p, _p,
                                   _i32, _p, _p, _p, _i64, _p, _f32, _p, _i32, _i32],
    "shoal_argmax_rows": [_p, _i64, _i64, _i32, _p, _i32],
    "shoal_moe_route": [_p, _i32, _i64, _i64, _p, _i64, _i32, _p, _i64, _i32, _f32, _i64, _i64, _i32, _p, _p, _p,
                        _i32],
    # experts.c (weight descriptors passed by address)
    "shoal_experts_use_amx": [_i32],
    "shoal_experts_use_sgemm": [_p],
    "shoal_moe_token": [_p, _p, _i64, _i64, _p, _p, _p, _p, _p, _i64, _i64, _p, _i32, _i32],
    "shoal_moe_tokens": [_p, _p, _i64, _i64, _i64, _p, _p, _p, _i64, _i64, _p, _i32, _i32],
    # replay.c
    "shoal_replay": [_p, _i64],
}
_VOID = {"shoal_experts_use_amx", "shoal_experts_use_sgemm"}


@functools.lru_cache(maxsize=1)
def kernels() -> ctypes.CDLL | None:
    """The compiled library, typed, or None where it cannot be built here (no C compiler, not Linux: the
    reason is logged once) or SHOAL_CPU_KERNELS=0."""
    if switched_off():
        return None
    lib = load(SOURCES, "kernels")
    if lib is None:
        return None
    for name, argtypes in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = None if name in _VOID else _i32
    lib.features = lib.shoal_kernel_features()
    return lib
