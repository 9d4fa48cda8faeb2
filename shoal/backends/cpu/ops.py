"""The CPU backend's operations: shoal's C kernels where they take the inputs, the torch reference
(shoal/backends/ops.py) where they do not (another dtype, a non-contiguous view, no C compiler here).

Each method checks its inputs and calls one kernel; which kernels exist was settled when this object
was made (`CpuOps(options)`), so no layer asks about the CPU. The kernels: fused.py (norm, SiLU, decode
attention, MoE routing, argmax), gemv.py (matrix-vector and batched-decode matmuls), experts.py (a lone
token's experts in one call) and packed_f32.py (float32 weights packed once for MKL); capture.py records
a decode step's kernel calls and replays them in one call.
"""

from __future__ import annotations

import torch
from torch import nn

from shoal.backends.cpu import experts, fused, gemv, packed_f32
from shoal.backends.cpu.capture import StepGraphs
from shoal.backends.ops import Ops


class CpuOps(Ops):
    name = "cpu"

    def __init__(self, kernels: str = "auto") -> None:
        """kernels: EngineConfig.cpu_kernels. "auto" takes the matrix-vector kernels only where they run
        vectorized (without AVX-512 they are scalar loops, slower than aten's: gemv.vectorized), "shoal"
        wherever they are built, "torch" none of shoal's kernels."""
        self.kernels = kernels
        self.fused = fused.available() and kernels != "torch"
        self.gemv = self.fused and gemv.chosen(kernels)

    # ---- norms and activations ---------------------------------------------------------------
    def rms_norm(self, x, weight, eps, residual=None):
        if (self.fused and x.dtype == weight.dtype and fused.accepts(x)
                and (residual is None or (residual.dtype == x.dtype and residual.shape == x.shape
                                          and residual.is_contiguous()))):
            out, summed = fused.rms_norm(x, weight, eps, residual)
            return out if residual is None else (out, summed)
        return super().rms_norm(x, weight, eps, residual)

    def head_rms_norm(self, x, weight, eps, heads):
        if (self.fused and x.dim() == 2 and x.dtype == weight.dtype and x.dtype in fused.DTYPES and x.is_cpu
                and x.stride(1) == 1 and weight.is_contiguous() and x.shape[1] == heads * weight.shape[0]):
            return fused.head_rms_norm(x, weight, eps, heads)
        return super().head_rms_norm(x, weight, eps, heads)

    def add(self, x, y):
        if (self.fused and fused.accepts(x) and y.dtype == x.dtype and y.is_contiguous()
                and (y.shape == x.shape or (y.dim() == 1 and y.shape[0] == x.shape[-1]))):
            return fused.add(x, y)
        return super().add(x, y)

    def silu_mul(self, gate_up):
        if self.fused and fused.accepts(gate_up):
            return fused.silu_mul(gate_up)
        return super().silu_mul(gate_up)

    # ---- matmuls -------------------------------------------------------------------------------
    def linear(self, x, weight, bias=None, prepared=None):
        """F.linear, except: float32 rows multiply with `prepared`, the weight packed once for MKL
        (packed_f32.py), where there is one; and for bf16 / fp16 rows a kernel that reads the weight
        faster than F.linear's matmul: shoal's matrix-vector kernel (gemv.c) for up to gemv.MAX_ROWS rows
        of a bf16 weight, else aten's torch.mv for a single row (one [5632, 1024] bf16 weight, 2 threads:
        531 against 836 us for F.linear); a batched decode step of bf16 rows, up to gemv.ROWS_MAX, goes to
        shoal's batched kernel (gemv.matmul_rows_bf16) where gemv.rows_kernel_takes says it is faster;
        other bf16 / fp16 rows to F.linear with their count rounded up (gemv.linear_in_buckets)."""
        if prepared is not None and prepared.takes(x, weight):
            y = prepared(x)
            return y if bias is None else self.add(y, bias)
        if x.is_cpu and x.dtype in (torch.bfloat16, torch.float16) and x.shape[-1] == weight.shape[1]:
            rows = x.numel() // weight.shape[1]
            if weight.dtype == torch.bfloat16 and 1 <= rows <= gemv.MAX_ROWS and self.gemv:
                y = gemv.gemv_bf16(x.reshape(rows, weight.shape[1]).to(torch.bfloat16), weight)
                y = y.view(*x.shape[:-1], weight.shape[0]).to(x.dtype)
                return y if bias is None else self.add(y, bias)
            if weight.dtype == torch.bfloat16 and x.dtype == torch.bfloat16 and self.gemv:
                flat = x.reshape(rows, weight.shape[1])
                if gemv.rows_kernel_takes(flat, weight.shape[1], "bf16"):
                    y = gemv.matmul_rows_bf16(flat, weight).view(*x.shape[:-1], weight.shape[0])
                    return y if bias is None else self.add(y, bias)
            if rows == 1:
                y = torch.mv(weight, x.reshape(-1)).view(*x.shape[:-1], weight.shape[0])
                return y if bias is None else y + bias
            return gemv.linear_in_buckets(x, weight, bias)
        return nn.functional.linear(x, weight, bias)

    def prepare_weights(self, model):
        """Pack float32 weights for MKL's sgemm (called through ctypes, not a torch operator), except under
        kernels "torch", which runs PyTorch's operators only (and so can be traced by torch.compile)."""
        from shoal.backends.cpu import system_memory

        if self.kernels == "torch":
            return 0
        return packed_f32.pack_model(model, system_memory().free_bytes)

    # ---- decode attention over the cache ------------------------------------------------------------
    def decode_attention(self, positions, slot_mapping, context_slots, context_lens, sliding_window, pool):
        if not (self.fused and fused.accepts(pool)):
            return None
        return fused.DecodeAttention(positions, slot_mapping, context_slots, context_lens, sliding_window, pool.dtype)

    # ---- mixture of experts --------------------------------------------------------------------------
    def moe_route(self, x, weight, top_k, sigmoid, bias, norm, scaling, load=None, groups=1, topk_groups=1,
                  group_method=None):
        if not self.fused:
            return None
        return fused.moe_route(x, weight, top_k, sigmoid, bias, norm, scaling, load, groups, topk_groups, group_method)

    def token_experts(self, fmt, kernel, expert_weights, group_size, dtype):
        # float32 experts multiply with MKL's packed sgemm (fast on any CPU); others need the gemv kernels
        if not self.fused or (not self.gemv and dtype != torch.float32):
            return None
        return experts.TokenExperts.build(fmt, kernel, expert_weights, group_size, dtype)

    # ---- capture ---------------------------------------------------------------------------------
    def step_graphs(self):
        lib = fused.library() if self.fused else None
        return StepGraphs(lib.shoal_replay) if lib is not None else None

    # ---- sampling ----------------------------------------------------------------------------------
    def argmax(self, scores):
        tokens = fused.argmax_rows(scores) if self.fused else None
        return tokens if tokens is not None else super().argmax(scores)
