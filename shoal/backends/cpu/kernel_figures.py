"""Each decode kernel of the CPU backend as `shoal doctor` shows it: the ISA path it runs on this machine
(shoal's C kernels at the chosen ISA level, or aten's where those are not chosen) and its measured share of
the bandwidth: the weight bytes it reads per second against a plain stream read of as many bytes (shoal's
C read, stream_read_gbps), both over more bytes than the caches hold (measured_bytes: twice the
last-level cache where that exceeds 64 MiB), timed in the same call. A share above 1 is possible: on an
AMX Xeon's memory the bf16 kernel read faster (31.5 GB/s) than any plain read tried (28-29.5).

The kernels are called through the same dispatch the layers use (CpuOps.linear, the CPU's int8 / int4
kernels, Ops.token_experts), so the path shown is the one a model takes here. Weights are random bytes
(a fixed scramble, written at memory speed). The measurement takes about two seconds where 64 MiB
exceed the caches, about ten on a VM with 480 MiB of L3 (600-700 MiB a matrix, 3.5 GB resident at its
peak), well under one in quick mode.
"""

from __future__ import annotations

import ctypes
import itertools
import os
from pathlib import Path
from typing import Any

import torch

from shoal.backends.cpu import gemv, isa
from shoal.backends.cpu.library import kernels as built_kernels
from shoal.backends.cpu.ops import CpuOps
from shoal.backends.cpu.quantized import cpu_kernels
from shoal.backends.measure import median_seconds

_MIB = 1 << 20
GROUP = 64  # int4 group size measured (the common one)
ROWS = 16  # activation rows of the batched-decode measurement
# MoE: DeepSeek-V2-Lite's expert shape (hidden 2048, expert inter 1408: 11 int4 blocks), its 6 routed experts
# per token (2 in quick mode)
MOE_HIDDEN, MOE_INTER, MOE_TOP_K = 2048, 1408, 6


def _features() -> int:
    lib = built_kernels() if gemv.available() else None
    return lib.features if lib is not None else 0


def _isa_name(features: int, integer: bool) -> str:
    """The registers and instructions a shoal kernel of this build multiplies with (gemv.c's feature bits)."""
    lanes = {"avx512": "AVX-512", "avx2": "AVX2", "neon": "NEON", "portable": "portable C"}[gemv.lanes()]
    if not integer:
        return "AVX512-BF16 pair products" if features & 2 else f"{lanes} lanes"
    dot = ", int8 dot products (vdotq_s32)" if features & 128 else ""
    return f"{lanes} lanes{dot}, int8 activations" if features & 1 else f"{lanes} lanes"


def _aten() -> str:
    return f"aten ({torch.backends.cpu.get_cpu_capability()})"


def _bytes_pattern(count: int, seed: int) -> torch.Tensor:
    """`count` bytes of a fixed scramble, written at memory speed (random numbers would take longer than the
    measurement); every page written, so that reads come from memory."""
    words = torch.arange(seed, seed + (count + 3) // 4, dtype=torch.int32).mul_(-1640531535)  # Knuth's hash
    return words.view(torch.uint8)[:count]


def _bf16_pattern(count: int, seed: int) -> torch.Tensor:
    """bf16 values of magnitude [0.5, 1), scrambled signs and mantissas: no subnormals, NaNs or infinities,
    which would time differently."""
    bits = _bytes_pattern(2 * count, seed).view(torch.int16)
    return ((bits & -32641) | 0x3F00).view(torch.bfloat16)  # keep sign and mantissa, exponent of 0.5


def _int4_tensors(n: int, k: int, seed: int) -> dict[str, torch.Tensor]:
    g = k // GROUP
    scales = (_bf16_pattern(2 * n * g, seed).float().abs() * 0.01).bfloat16().view(2, n, g)
    return {"qweight": _bytes_pattern(n * k // 2, seed).view(n, k // 2), "scales": scales[0], "zeros": scales[1]}


def _int8_tensors(n: int, k: int, seed: int) -> dict[str, torch.Tensor]:
    return {"qweight": _bytes_pattern(n * k, seed).view(torch.int8).view(n, k),
            "scales": (_bf16_pattern(n, seed).float().abs() * 0.01).bfloat16()}


def _bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _int4_bytes(n: int, k: int) -> int:
    """What _int4_tensors(n, k) holds: the codes, and a bf16 scale and zero per group."""
    return n * k // 2 + 2 * 2 * n * (k // GROUP)


def last_level_cache_bytes() -> int:
    """The largest CPU cache of cpu0 (/sys/devices/system/cpu/cpu0/cache), 0 where it is not listed."""
    largest = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            largest = max(largest, int(digits) * scale)
    return largest


def measured_bytes(quick: bool) -> int:
    """Weight bytes per measured matrix: 64 MiB, or twice the last-level cache where that is larger (an AMX
    Xeon's VM sees 480 MiB of L3, which held the 64 MiB, so its reads were the cache's, not memory's),
    capped at 1 GiB and at a 32nd of the available memory (a row's tensors live only while it is timed; the
    int4 re-layout briefly holds about six times its bytes)."""
    if quick:
        return 4 * _MIB
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(64 * _MIB, min(2 * last_level_cache_bytes(), 1 << 30, available // 32)) // _MIB * _MIB


def stream_read_gbps(nbytes: int, backend, reps: int, min_rep: float) -> float:
    """GB/s of a plain read of `nbytes` by torch's threads: shoal's C stream read where the kernels are built
    (gemv.c: shoal_stream_read), else torch's sum (which on an AMX Xeon's memory read less than the bf16
    kernel did)."""
    lib = built_kernels() if gemv.available() else None
    data = _bytes_pattern(nbytes // 256 * 256, 7)
    if lib is not None:
        out = ctypes.c_uint64()
        threads = torch.get_num_threads()
        seconds = median_seconds(lambda: lib.shoal_stream_read(data.data_ptr(), data.numel(), ctypes.byref(out),
                                                               threads), backend, reps, min_rep)
    else:
        words = data.view(torch.float32)  # any bit pattern: summing costs the same
        seconds = median_seconds(words.sum, backend, reps, min_rep)
    return data.numel() / seconds / 1e9


def kernel_figures(backend, quick: bool = False) -> list[dict[str, Any]]:
    """One row per kernel: {"kernel", "path", "weight_bytes", "gbps", "read_gbps", "share"} (gbps None where
    the kernel is not measured here, with the reason as its path). Each row's weights are made, timed and
    dropped in turn, so at most one row's bytes (about twice `measured_bytes`) are held at once."""
    nbytes = measured_bytes(quick)  # weight bytes per matrix-vector product
    reps, min_rep = (3, 0.002) if quick else (3, 0.01)
    features, level = _features(), isa.chosen()
    ops = CpuOps("auto")
    shoal_here = ops.gemv
    quant = cpu_kernels(None)
    k = 2048
    x = _bf16_pattern(k, 1).view(1, k)
    # (kernel, path, make): make() -> (weight bytes read per call, the call), or None where not measured
    rows: list[tuple[str, str, Any]] = []

    def bf16_row():
        w = _bf16_pattern(nbytes // 2, 2).view(-1, k)
        return w.numel() * 2, lambda: ops.linear(x, w)

    def int8_row():
        raw = _int8_tensors(nbytes // k, k, 3)
        weight = quant["int8"].prepare(raw, 0)
        return _bytes(raw), lambda: quant["int8"](x, weight, 0)

    # aten's int4 layout takes seconds to prepare (a load-time cost): half the bytes there
    int4_rows = (2 if shoal_here else 1) * nbytes // k

    def int4_row(activations):
        raw = _int4_tensors(int4_rows, k, 4)
        weight = quant["int4"].prepare(raw, GROUP)
        return _bytes(raw), lambda: quant["int4"](activations, weight, GROUP)

    rows.append(("bf16 matvec", f"shoal {level}: {_isa_name(features, False)}" if shoal_here else _aten(), bf16_row))
    rows.append(("int8 matvec", f"shoal {level}: {_isa_name(features, True)}" if shoal_here else _aten(), int8_row))
    rows.append(("int4 matvec", f"shoal {level}: {_isa_name(features, True)}" if shoal_here else _aten(),
                 lambda: int4_row(x)))

    xs = _bf16_pattern(ROWS * k, 5).view(ROWS, k)
    probe = quant["int4"].prepare(_int4_tensors(64, k, 4), GROUP)
    if "qweight_gemv" in probe and gemv.rows_kernel_takes(xs, k, "int4"):
        extension = "AMX tiles" if features & 8 else "NEON" if features & 32 else "AVX512-BF16"
        rows.append((f"batched rows (int4, {ROWS} rows)", f"shoal {level}: {extension}", lambda: int4_row(xs)))
    else:
        rows.append((f"batched rows (int4, {ROWS} rows)",
                     "not measured: no batched kernel here (AVX512-BF16 or NEON), F.linear on the dequantized "
                     "weight instead", None))

    top_k = MOE_TOP_K if shoal_here and not quick else 2
    xm = _bf16_pattern(MOE_HIDDEN, 6).view(1, MOE_HIDDEN)
    chosen = torch.arange(top_k).view(1, -1)
    gates = torch.full((1, top_k), 1.0 / top_k)

    def expert_set(seed: int):
        return [(quant["int4"].prepare(_int4_tensors(2 * MOE_INTER, MOE_HIDDEN, seed + 2 * e), GROUP),
                 quant["int4"].prepare(_int4_tensors(MOE_HIDDEN, MOE_INTER, seed + 2 * e + 1), GROUP))
                for e in range(top_k)]

    set_bytes = top_k * (_int4_bytes(2 * MOE_INTER, MOE_HIDDEN) + _int4_bytes(MOE_HIDDEN, MOE_INTER))
    first_set = expert_set(10)
    one_call = ops.token_experts("int4", quant["int4"].name, first_set, GROUP, torch.bfloat16) is not None

    def moe_row():
        # one token's experts at a time, from sets that together exceed the caches: each call reads a set the
        # previous calls did not, as a decode step's experts come from memory
        count = max(1, -(-nbytes // set_bytes))
        sets = [first_set] + [expert_set(10 + 2 * top_k * i) for i in range(1, count)]
        if one_call:
            calls = [ops.token_experts("int4", quant["int4"].name, experts, GROUP, torch.bfloat16) for experts in sets]
            run = [lambda call=call: call(xm, gates, chosen) for call in calls]
        else:
            def expert_by_expert(experts):  # each chosen expert's gate_up and down, as the layer runs them
                for gate_up, down in experts:
                    quant["int4"](quant["int4"](xm, gate_up, GROUP)[:, :MOE_INTER].contiguous(), down, GROUP)

            run = [lambda experts=experts: expert_by_expert(experts) for experts in sets]
        turn = itertools.cycle(run)
        return set_bytes, lambda: next(turn)()

    moe_path = f"shoal {level}: {_isa_name(features, True)}, one call" if one_call else f"{_aten()}, expert by expert"
    rows.append((f"MoE experts (int4, {top_k} routed)", moe_path, moe_row))

    read = stream_read_gbps(nbytes, backend, reps, min_rep)
    figures = []
    for name, path, make in rows:
        gbps = None
        if make is not None:
            weight_bytes, fn = make()
            gbps = weight_bytes / median_seconds(fn, backend, reps, min_rep) / 1e9
            del fn
        else:
            weight_bytes = _int4_bytes(int4_rows, k)
        figures.append({"kernel": name, "path": path, "weight_bytes": weight_bytes, "gbps": gbps, "read_gbps": read,
                        "share": None if gbps is None else gbps / read})
    return figures
