"""Each decode kernel of the CPU backend as `shoal doctor` shows it: the ISA path it runs on this machine
(shoal's C kernels at the chosen ISA level, or aten's where those are not chosen) and its measured share of
the bandwidth: the weight bytes it reads per second against a plain stream read (a sum) of as many bytes,
both over more bytes than the caches hold, timed in the same call.

The kernels are called through the same dispatch the layers use (CpuOps.linear, the CPU's int8 / int4
kernels, Ops.token_experts), so the path shown is the one a model takes here. Weights are random bytes
(a fixed scramble, written at memory speed: the measurement stays within about two seconds on a quiet
machine, well under one in quick mode).
"""

from __future__ import annotations

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


def kernel_figures(backend, quick: bool = False) -> list[dict[str, Any]]:
    """One row per kernel: {"kernel", "path", "weight_bytes", "gbps", "read_gbps", "share"} (gbps None where
    the kernel is not measured here, with the reason as its path)."""
    nbytes = (4 if quick else 64) * _MIB  # weight bytes per matrix-vector product
    reps, min_rep = (3, 0.002) if quick else (3, 0.01)
    features, level = _features(), isa.chosen()
    ops = CpuOps("auto")
    shoal_here = ops.gemv
    quant = cpu_kernels(None)
    k = 2048
    x = _bf16_pattern(k, 1).view(1, k)
    rows: list[tuple[str, str, int, Any]] = []  # (kernel, path, weight bytes, the call or None)

    w = _bf16_pattern(nbytes // 2, 2).view(-1, k)
    rows.append(("bf16 matvec", f"shoal {level}: {_isa_name(features, False)}" if shoal_here else _aten(),
                 w.numel() * 2, lambda: ops.linear(x, w)))
    int8_raw = _int8_tensors(nbytes // k, k, 3)
    int8 = quant["int8"].prepare(int8_raw, 0)
    rows.append(("int8 matvec", f"shoal {level}: {_isa_name(features, True)}" if shoal_here else _aten(),
                 _bytes(int8_raw), lambda: quant["int8"](x, int8, 0)))
    # aten's int4 layout takes seconds to prepare (a load-time cost): half the bytes there
    int4_raw = _int4_tensors((2 if shoal_here else 1) * nbytes // k, k, 4)
    int4 = quant["int4"].prepare(int4_raw, GROUP)
    rows.append(("int4 matvec", f"shoal {level}: {_isa_name(features, True)}" if shoal_here else _aten(),
                 _bytes(int4_raw), lambda: quant["int4"](x, int4, GROUP)))

    xs = _bf16_pattern(ROWS * k, 5).view(ROWS, k)
    if "qweight_gemv" in int4 and gemv.rows_kernel_takes(xs, k, "int4"):
        extension = "AMX tiles" if features & 8 else "NEON" if features & 32 else "AVX512-BF16"
        rows.append((f"batched rows (int4, {ROWS} rows)", f"shoal {level}: {extension}", _bytes(int4_raw),
                     lambda: quant["int4"](xs, int4, GROUP)))
    else:
        rows.append((f"batched rows (int4, {ROWS} rows)",
                     "not measured: no batched kernel here (AVX512-BF16 or NEON), F.linear on the dequantized "
                     "weight instead", _bytes(int4_raw), None))

    top_k = MOE_TOP_K if shoal_here and not quick else 2
    experts = [(quant["int4"].prepare(_int4_tensors(2 * MOE_INTER, MOE_HIDDEN, 10 + e), GROUP),
                quant["int4"].prepare(_int4_tensors(MOE_HIDDEN, MOE_INTER, 20 + e), GROUP))
               for e in range(top_k)]
    token = ops.token_experts("int4", quant["int4"].name, experts, GROUP, torch.bfloat16)
    chosen = torch.arange(top_k).view(1, -1)
    gates = torch.full((1, top_k), 1.0 / top_k)
    moe_bytes = sum(_bytes(t) for pair in experts for t in pair)
    moe_name = f"MoE experts (int4, {top_k} routed)"
    if token is not None:
        xm = _bf16_pattern(MOE_HIDDEN, 6).view(1, MOE_HIDDEN)
        rows.append((moe_name, f"shoal {level}: {_isa_name(features, True)}, one call", moe_bytes,
                     lambda: token(xm, gates, chosen)))
    else:
        xm = _bf16_pattern(MOE_HIDDEN, 6).view(1, MOE_HIDDEN)

        def expert_by_expert():  # each chosen expert's gate_up and down, as the layer runs them without the call
            for gate_up, down in experts:
                quant["int4"](quant["int4"](xm, gate_up, GROUP)[:, :MOE_INTER].contiguous(), down, GROUP)

        rows.append((moe_name, f"{_aten()}, expert by expert", moe_bytes, expert_by_expert))

    stream = torch.ones(nbytes // 4, dtype=torch.float32)
    read = stream.numel() * 4 / median_seconds(stream.sum, backend, reps, min_rep) / 1e9
    figures = []
    for name, path, weight_bytes, fn in rows:
        gbps = None if fn is None else weight_bytes / median_seconds(fn, backend, reps, min_rep) / 1e9
        figures.append({"kernel": name, "path": path, "weight_bytes": weight_bytes, "gbps": gbps, "read_gbps": read,
                        "share": None if gbps is None else gbps / read})
    return figures

