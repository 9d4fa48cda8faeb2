"""Run by tests/backends/test_cpu_gemv_isa.py in a process of its own per ISA level (SHOAL_CPU_ISA): every
matrix-vector kernel of csrc/gemv.c (and the batched integer kernel of csrc/rows_q8.c) over fixed inputs, in each weight format, activation dtype, row
count and shape that takes a different path through it; the outputs saved to the file named on the
command line (torch.save), with the level and the registers the lanes live in."""

from __future__ import annotations

import sys

import torch

from shoal.backends.cpu import gemv, isa
from shoal.quant.formats import Int4GroupWeight, Int8ChannelWeight


def outputs() -> dict[str, torch.Tensor]:
    out = {}
    g = torch.Generator().manual_seed(0)
    for k in (48, 80, 256, 1040):  # 48, 80, 1040: not a multiple of the unrolled loops or of 64
        w = torch.randn(37, k, generator=g) * 0.05
        wb = w.bfloat16()
        q8 = Int8ChannelWeight.quantize(w, torch.float32)
        q8.qweight[0, :4] = -128  # the full int8 range
        for dtype in (torch.float32, torch.bfloat16):
            for rows in (1, 3, 5, 8):
                x = (torch.randn(rows, k, generator=g) * 2).to(dtype)
                out[f"bf16-k{k}-{dtype}-{rows}"] = gemv.gemv_bf16(x, wb)
                out[f"int8-k{k}-{dtype}-{rows}"] = gemv.gemv_int8(x, q8.qweight, q8.scales)
    for group in (32, 64, 128):
        for scale_dtype in (torch.bfloat16, torch.float32):
            for k in (128, 384, 2560):  # 2560 / 32 = 80 groups: zero terms with a partial last 16
                w = torch.randn(45, k, generator=g) * 0.05  # 45 rows: four at a time, then a tail of one
                q4 = Int4GroupWeight.quantize(w, group, scale_dtype)
                t = gemv.int4_relayout(q4.packed, q4.scales, q4.zeros)
                for dtype in (torch.float32, torch.bfloat16):
                    for rows in (1, 2, 5):
                        x = torch.randn(rows, k, generator=g).to(dtype)
                        out[f"int4-g{group}-{scale_dtype}-k{k}-{dtype}-{rows}"] = gemv.gemv_int4(x, t, group)
                # the batched integer kernel (rows_q8.c): one and two lane groups, a partial one, four
                for rows in (9, 16, 33, 64):
                    x = torch.randn(rows, k, generator=g).bfloat16()
                    out[f"rows-q8-int4-g{group}-{scale_dtype}-k{k}-{rows}"] = gemv.matmul_rows_q8_int4(x, t, group)
    return out


if __name__ == "__main__":
    torch.save({"level": isa.chosen(), "lanes": gemv.lanes(), "pair_products": bool(gemv.library().features & 2),
                "outputs": outputs()}, sys.argv[1])
