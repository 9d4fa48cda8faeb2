"""Measures what one device can do — large-copy memory bandwidth and square-matmul throughput —
for `shoal doctor`, the splitter and the planner. Runs on torch's current thread count.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import TYPE_CHECKING, Callable

import torch

from shoal.backends.profile import ThroughputProfile

if TYPE_CHECKING:  # base.py calls into this module: no import back at run time
    from shoal.backends.base import Backend

_MIB = 1 << 20


def median_seconds(fn: Callable[[], object], backend: Backend, reps: int, min_rep_seconds: float) -> float:
    """Median wall time of one fn() call over `reps` repetitions, synchronizing the device around each.

    A repetition runs fn() enough times back to back to last `min_rep_seconds`, so that on fast
    accelerators the timer's and synchronize's own cost does not count as device time.
    """
    fn()  # warm-up: first touch of pages, kernel selection, allocator growth
    backend.synchronize()
    start = time.perf_counter()
    fn()
    backend.synchronize()
    single = max(time.perf_counter() - start, 1e-9)
    calls = max(1, math.ceil(min_rep_seconds / single))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        backend.synchronize()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def measure_bandwidth(backend: Backend, index: int = 0, quick: bool = False) -> float:
    """GB/s (1e9 bytes/s) moved by dst.copy_(src), counting bytes read plus bytes written."""
    device = backend.torch_device(index)
    nbytes = (64 if quick else 256) * _MIB
    # Two buffers must fit in half of what is free, so measuring never pushes the device into swap or OOM;
    # a smaller copy still far exceeds caches down to 16 MiB.
    free = backend.memory_info(index).free_bytes
    while nbytes > 16 * _MIB and 4 * nbytes > free:
        nbytes //= 2
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), backend, reps=5 if quick else 10,
                              min_rep_seconds=0.005 if quick else 0.02)
    return 2 * nbytes / seconds / 1e9


def measure_matmul(backend: Backend, dtype: torch.dtype, index: int = 0, quick: bool = False) -> float:
    """TFLOP/s of an n×n by n×n matmul in `dtype` (2·n³ flops each)."""
    device = backend.torch_device(index)
    n = 512 if quick else 256
    if not quick:
        # Grow n until one matmul takes ~20 ms: a 2048 matmul is a few hundred microseconds on a
        # big GPU, far from its peak, while on a CPU it already takes that long — and where the dtype
        # has no native kernel (bf16 on an AVX2-only CPU: 0.24 GFLOP/s on one thread, 72 s for one
        # 2048 matmul) starting small keeps the measurement to seconds.
        free = backend.memory_info(index).free_bytes
        itemsize = torch.empty((), dtype=dtype).element_size()
        while n < 16384 and 3 * (2 * n) ** 2 * itemsize * 2 < free:
            a = torch.randn(n, n, dtype=dtype, device=device)
            a @ a  # untimed: the first call pays for library handles and kernel selection
            backend.synchronize()
            start = time.perf_counter()
            a @ a
            backend.synchronize()
            if time.perf_counter() - start >= 0.02:
                break
            n *= 2
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    out = torch.empty(n, n, dtype=dtype, device=device)
    seconds = median_seconds(lambda: torch.mm(a, b, out=out), backend, reps=3 if quick else 5,
                              min_rep_seconds=0.005 if quick else 0.05)
    return 2 * n**3 / seconds / 1e12


def measure_device(backend: Backend, index: int = 0, quick: bool = False) -> ThroughputProfile:
    """Bandwidth and matmul throughput (float32 and the device's half-precision type) of one device.

    quick=True uses small sizes and few repetitions (about a second on a laptop CPU): figures for
    tests and a first look, not for planning.
    """
    backend.set_device(index)
    bandwidth = measure_bandwidth(backend, index, quick)
    supported = backend.supported_dtypes()
    dtypes = [torch.float32]
    # bf16 where the device has it; fp16 only on devices without bf16 (e.g. Ascend 910A).
    if torch.bfloat16 in supported:
        dtypes.append(torch.bfloat16)
    elif torch.float16 in supported:
        dtypes.append(torch.float16)
    tflops = {str(dtype).removeprefix("torch."): measure_matmul(backend, dtype, index, quick) for dtype in dtypes}
    return ThroughputProfile(memory_bandwidth_gbps=bandwidth, matmul_tflops=tflops)
