"""The CPU backend: always present, the fallback when no accelerator is found.

Memory comes from /proc/meminfo (capped by a cgroup limit when one is set); whether bf16 and
fp16 are native comes from the CPU's feature flags.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
from pathlib import Path

import torch

from shoal.backends.base import Backend, MemoryInfo, packed_matmul_kernels

# MKL's conditional numerical reproducibility (mkl_cbwr.h): its code path chosen for this CPU, strictly.
_CBWR_AUTO, _CBWR_STRICT, _CBWR_ENV = 2, 0x10000, "MKL_CBWR"


def make_mkl_reproducible() -> None:
    """Ask MKL for the same bits from the same inputs, run after run (MKL_CBWR=AUTO,STRICT), unless the user
    set MKL_CBWR. Without it MKL's sgemm may sum in another order from one call to the next: on an AVX-512
    Xeon (AMX) a float32 MoE's packed expert matmuls (csrc/experts.c, packed_f32.py) gave other last bits
    in 11 of 11 repeats of one generate (ad hoc), so a replayed decode step could not equal the eager one it
    recorded. On AMD CPUs MKL's AVX2 code was already reproducible. No cost was measured (16-layer Llama,
    float32, batch 1 / 8 / 16 decode and a 400-token prefill, ad hoc, within noise). MKL takes the mode
    only before its first call, so this module sets it when it is imported (`import shoal` imports it
    through the backend registry); where MKL ran before (torch imported and used first) the mode stays
    off, as before."""
    if _CBWR_ENV in os.environ or not torch.backends.mkl.is_available():
        return
    try:
        # mkl_cbwr_set's own name is not exported by torch's library; its service function is.
        set_mode = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so")).mkl_serv_cbwr_set
    except (OSError, AttributeError):
        return
    set_mode.argtypes, set_mode.restype = [ctypes.c_int], ctypes.c_int
    code = set_mode(_CBWR_AUTO | _CBWR_STRICT)
    if code:
        logging.getLogger(__name__).debug(
            "MKL's reproducible mode was not set (code %d): MKL ran before shoal was imported", code)


make_mkl_reproducible()  # before MKL's first call

# Feature flags (x86 "flags", aarch64 "Features" in /proc/cpuinfo) that mean the hardware
# multiplies in the dtype itself rather than converting to fp32 first.
_NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # "bf16" is the aarch64 name
_NATIVE_FP16_FLAGS = {"avx512_fp16", "amx_fp16", "asimdhp"}


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, feature flags) of the first CPU; empty where /proc/cpuinfo is absent (macOS, Windows)."""
    from shoal.backends.cpu import isa

    info = isa.cpuinfo()
    name = info.get("model name") or info.get("hardware") or info.get("cpu model") or ""
    flags = frozenset((info.get("flags") or info.get("features") or "").split())
    return name or platform.processor() or platform.machine(), flags


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):  # absent, or "max" meaning no limit
        return None


def _cgroup_limit() -> tuple[int, int] | None:
    """(limit, usage) bytes of this process's memory cgroup, or None when unlimited.

    Inside a container /proc/meminfo shows the host's memory; the cgroup limit is what the
    kernel actually enforces before it kills us.
    """
    for limit_path, usage_path in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ):
        limit = _read_int(limit_path)
        if limit is not None and limit < (1 << 60):  # v1 writes a huge number for "no limit"
            return limit, _read_int(usage_path) or 0
    return None


def system_memory() -> MemoryInfo:
    """Free and total host memory; usable by any backend that shares host RAM."""
    meminfo: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            meminfo[key] = int(value.split()[0]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    if "MemTotal" in meminfo:
        total = meminfo["MemTotal"]
        free = meminfo.get("MemAvailable", meminfo.get("MemFree", 0))
    else:  # no /proc (macOS): sysconf knows total and free pages, not reclaimable cache
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * page
        except (ValueError, OSError):
            free = total
    cgroup = _cgroup_limit()
    if cgroup is not None:
        limit, usage = cgroup
        total = min(total, limit)
        free = min(free, max(limit - usage, 0))
    return MemoryInfo(free_bytes=free, total_bytes=total)


class CpuBackend(Backend):
    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"
    visible_devices_env = None  # threads, not devices; OMP_NUM_THREADS / torch.set_num_threads choose them
    priority = 10

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def device_name(self, index: int = 0) -> str:
        return _cpuinfo()[0]

    def memory_info(self, index: int = 0) -> MemoryInfo:
        return system_memory()

    def set_isa_level(self, level: str | None) -> None:
        from shoal.backends.cpu import isa

        isa.choose(level)

    def native_dtypes(self) -> list[torch.dtype]:
        flags = _cpuinfo()[1]
        native = [torch.float32]
        if flags & _NATIVE_BF16_FLAGS:
            native.append(torch.bfloat16)
        if flags & _NATIVE_FP16_FLAGS:
            native.append(torch.float16)
        return native

    def supported_dtypes(self) -> list[torch.dtype]:
        # torch computes bf16 and fp16 on any CPU (by converting); only with hardware support
        # is bf16 faster than fp32, so it leads the list (and becomes --dtype auto) only then.
        if torch.bfloat16 in self.native_dtypes():
            return [torch.bfloat16, torch.float32, torch.float16]
        return [torch.float32, torch.bfloat16, torch.float16]

    def quantized_matmul_kernels(self) -> list[str]:
        from shoal.backends.cpu import gemv as cpu_gemv

        kernels = packed_matmul_kernels("CPU", int4_op="aten::_weight_int4pack_mm_for_cpu")
        return (["cpu-gemv"] if cpu_gemv.vectorized() else []) + kernels

    def ops(self, kernels: str = "auto"):
        from shoal.backends.cpu.ops import CpuOps

        return CpuOps(kernels)

    def linear_fn(self, weight_format: str, kernels: str = "auto"):
        from shoal.backends.cpu import gemv as cpu_gemv
        from shoal.backends.cpu.quantized import cpu_kernels

        use_gemv = cpu_gemv.chosen(kernels)
        kernel = cpu_kernels(use_gemv).get(weight_format)
        packed = {"int8": "int8pack", "int4": "int4pack"}.get(weight_format)
        if kernel is not None and (packed is None or use_gemv or packed in self.quantized_matmul_kernels()):
            return kernel
        return super().linear_fn(weight_format)

    def kernel_figures(self, quick: bool = False) -> list[dict]:
        from shoal.backends.cpu.kernel_figures import kernel_figures

        return kernel_figures(self, quick)

    def extra_info(self) -> dict[str, str]:
        flags = _cpuinfo()[1]
        notable = _NATIVE_BF16_FLAGS | _NATIVE_FP16_FLAGS | {"avx2", "avx512f", "amx_tile", "sve", "asimd"}
        shown = sorted(flags & notable)
        return {
            "capability": torch.backends.cpu.get_cpu_capability(),
            "features": " ".join(shown) or "unknown",
            "cores": str(os.cpu_count() or 1),
            "threads": str(torch.get_num_threads()),
            "kernel ISA level": _isa_level(),
            "decode kernels": _decode_kernels(),
            "float32 matmuls": _float32_matmuls(),
        }


def _float32_matmuls() -> str:
    """How float32 linear layers multiply more than one row here (shoal/backends/cpu/packed_f32.py)."""
    from shoal.backends.cpu import packed_f32 as cpu_packed_f32

    if cpu_packed_f32.available():
        return (f"weights packed once at load for MKL's sgemm (while the copies fit in "
                f"{cpu_packed_f32.MEMORY_SHARE:.0%} of free memory)")
    return f"aten (MKL's packed sgemm absent from this torch, or {cpu_packed_f32.ENV_SWITCH}=0)"


def _isa_level() -> str:
    from shoal.backends.cpu import isa

    level = isa.chosen()
    why = f"{isa.ENV}={level}" if isa.default_level() == level and level != "native" else (
        "the default: every extension this CPU has" if level == "native" else "--cpu-isa")
    return f"{level} ({why}; this CPU runs {', '.join(isa.runnable_levels())})"


def _decode_kernels() -> str:
    """What decode runs on here, and why (shoal's C kernels are built on first use)."""
    from shoal.backends.cpu import fused as cpu_ops, gemv as cpu_gemv

    if not cpu_gemv.available():
        return "aten (shoal's C kernels not built: no C compiler, or SHOAL_CPU_KERNELS=0)"
    fused = "fused norm / SiLU / attention" if cpu_ops.available() else "aten norm / attention (SHOAL_CPU_OPS=0)"
    if not cpu_gemv.vectorized():
        return (f"aten matmuls (shoal gemv built without vector lanes: its portable loops are slower than "
                f"aten's kernels here), {fused}; decode steps replayed in one call where every op is shoal's (float32)")
    int_path = "int8 activations" if cpu_gemv.quantizes_activations() else "float activations"
    rows = ""
    if cpu_gemv.rows_kernels_available():
        rows = (f"; batched decode ({cpu_gemv.MAX_ROWS + 1}-{cpu_gemv.ROWS_MAX} rows) on AMX tiles" if cpu_gemv.rows_use_amx()
                else f"; batched int8 / int4 decode ({cpu_gemv.MAX_ROWS + 1}-{cpu_gemv.ROWS_MAX_WITHOUT_AMX} rows) "
                f"with {'NEON' if cpu_gemv.lanes() == 'neon' else 'AVX512-BF16'}")
    return (f"shoal gemv ({cpu_gemv.lanes().upper()} lanes; int8 / int4 weights x {int_path}), {fused}; each decode step recorded once and "
            f"replayed in one call{rows}")
