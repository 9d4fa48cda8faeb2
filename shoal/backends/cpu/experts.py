"""A decode step's MoE experts in C (csrc/experts.c), for DeepSeek-style models: a token's chosen experts'
gate_up, SiLU, down and the weighted sum in one call where torch would make a dozen (a few tokens: one
call each), or a batch's grouped by expert in one call. The CPU backend hands `TokenExperts` out through
Ops.token_experts; the experts' layers (shoal/layers/moe.py, shoal/quant/layers.py) call it for a step's
tokens. Each product is the kernel the layer's own matmul runs for those rows (csrc/gemv.c), so the sums
are the bits of the expert-by-expert path wherever that path multiplies with the same kernel.

`weight_descriptor` says how the C side reads one weight: csrc/shoal_cpu.h's ShoalWeight, mirrored here
as `WeightDescriptor`.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from shoal.backends.cpu import fused as cpu_ops, gemv as cpu_gemv, packed_f32 as cpu_packed_f32
from shoal.backends.cpu.build import switched_off
from shoal.backends.cpu.capture import call
from shoal.backends.cpu.library import kernels

WEIGHT_BF16, WEIGHT_INT8, WEIGHT_INT4, WEIGHT_F32_PACKED = 0, 1, 2, 3

_p, _i64 = ctypes.c_void_p, ctypes.c_int64


class WeightDescriptor(ctypes.Structure):
    """csrc/shoal_cpu.h's ShoalWeight, field for field."""

    _fields_ = [("kind", _i64), ("weight", _p), ("scale", _p), ("zero", _p), ("scale_bf16", _i64), ("group", _i64),
                ("bias", _p), ("n", _i64), ("k", _i64)]


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    """The kernels, told once how float32 packed weights multiply; None where they cannot be built or
    SHOAL_CPU_KERNELS=0 / SHOAL_CPU_OPS=0."""
    if switched_off("SHOAL_CPU_OPS") or not cpu_gemv.available() or not cpu_ops.available():
        return None
    lib = kernels()
    lib.shoal_experts_use_amx(int(cpu_gemv.rows_use_amx()))
    lib.shoal_experts_use_sgemm(cpu_packed_f32.compute_address())
    return lib


def available() -> bool:
    return _library() is not None


def _check(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"shoal's CPU {what} failed (code {code}); this is a bug in shoal")


def weight_descriptor(fmt: str | None, kernel: str | None, t: dict[str, torch.Tensor], group_size: int,
                      dtype: torch.dtype, bias: torch.Tensor | None = None,
                      packed: cpu_packed_f32.PackedF32 | None = None) -> WeightDescriptor | None:
    """How the C side reads one weight: `t` holds {"weight": bf16 [N, K]} (fmt None) or a quantized
    layer's tensors in its kernel's layout (fmt "int8" / "int4", kernel "int8-gemv" / "int4-gemv"); a
    float32 weight {"weight": float32 [N, K]} is read through `packed`, its copy packed for MKL, which the
    layer's own forward multiplies with too. None where the kernels would not take it exactly as the
    layer's own forward does."""
    if bias is not None and (bias.dtype != dtype or not bias.is_contiguous()):
        return None
    bias_ptr = bias.data_ptr() if bias is not None else None
    if fmt is None and dtype == torch.float32:
        if packed is None or not packed.packs(t["weight"]) or cpu_packed_f32.compute_address() is None:
            return None
        return WeightDescriptor(WEIGHT_F32_PACKED, packed.buffer.data_ptr(), None, None, 0, 0, bias_ptr, packed.n, packed.k)
    if fmt is None:
        w = t["weight"]
        if w.dtype != torch.bfloat16 or dtype != torch.bfloat16 or not w.is_contiguous() or w.device.type != "cpu":
            return None
        n, k = w.shape
        return WeightDescriptor(WEIGHT_BF16, w.data_ptr(), None, None, 0, 0, bias_ptr, n, k)
    if not all(v.is_contiguous() and v.device.type == "cpu" for v in t.values()):
        return None
    if fmt == "int8" and kernel == "int8-gemv" and "scales_f32" in t and t["qweight"].shape[1] % 16 == 0:
        n, k = t["qweight"].shape
        return WeightDescriptor(WEIGHT_INT8, t["qweight"].data_ptr(), t["scales_f32"].data_ptr(), None, 0, 0, bias_ptr, n, k)
    if fmt == "int4" and kernel == "int4-gemv" and "qweight_gemv" in t:
        scales = t["scales"]
        n, k = t["qweight_gemv"].shape[0], t["qweight_gemv"].shape[1] * 2
        return WeightDescriptor(WEIGHT_INT4, t["qweight_gemv"].data_ptr(), scales.data_ptr(), t["zeros"].data_ptr(),
                            int(scales.dtype == torch.bfloat16), group_size, bias_ptr, n, k)
    return None


class TokenExperts:
    """One MoE layer's routed experts for `shoal_moe_token`: a lone token's chosen experts (gate_up, SiLU,
    down, weighted sum; and the shared experts, where given) in one call. `build` returns None where any
    expert's weights are not ones the kernels take."""

    def __init__(self, gate_up: list[WeightDescriptor], down: list[WeightDescriptor], inter: int, keep: list) -> None:
        self.num_experts = len(gate_up)
        self.gate_up = (WeightDescriptor * len(gate_up))(*gate_up)
        self.down = (WeightDescriptor * len(down))(*down)
        self.inter = inter
        self._keep = keep

    @classmethod
    def build(cls, fmt: str | None, kernel: str | None, experts: list[tuple[dict, dict]], group_size: int,
              dtype: torch.dtype) -> TokenExperts | None:
        """experts: each expert's (gate_up, down) tensors, as `weight_descriptor` takes them; a float32
        weight's packed copy (packed_f32.PackedF32) under "prepared"."""
        if _library() is None or dtype not in cpu_ops.DTYPES or not experts:
            return None

        def describe(t: dict):
            tensors = {k: v for k, v in t.items() if k != "prepared"}
            return weight_descriptor(fmt, kernel, tensors, group_size, dtype, packed=t.get("prepared"))

        gate_up = [describe(g) for g, _ in experts]
        down = [describe(d) for _, d in experts]
        if any(d is None for d in gate_up + down):
            return None
        return cls(gate_up, down, down[0].k, experts)

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor,
                 shared: tuple[WeightDescriptor, WeightDescriptor] | None = None, threads: int | None = None) -> torch.Tensor | None:
        """x [tokens, hidden] (contiguous, this layer's dtype), weights float32 [tokens, top_k], expert_ids
        [tokens, top_k] -> each token's weighted sum [tokens, hidden], plus the shared experts' gated MLP
        (gate_up, down) where given; or None where the inputs are not ones the call takes. One C call per
        token (a few tokens: a decode step's, a verified draft's), each the lone-token sum, so a token gets
        the same bits alone and beside others, and a recorded step replays them all. More tokens (their
        choices outnumber the experts) go in one call grouped by expert (shoal_moe_tokens): the grouped
        torch path's sums in its order (layers/moe.py), each expert's weights read once."""
        if weights.dtype != torch.float32 or expert_ids.dtype != torch.int64 or expert_ids.shape[1] > 64 \
                or x.dtype not in cpu_ops.DTYPES or not x.is_contiguous() or x.dim() != 2:
            return None
        weights, expert_ids = weights.contiguous(), expert_ids.contiguous()
        out = torch.empty_like(x)
        shared_gate_up, shared_down = (ctypes.addressof(shared[0]), ctypes.addressof(shared[1])) if shared else (None, None)
        lib = _library()
        row, top_k = x.shape[1] * x.element_size(), expert_ids.shape[1]
        if x.shape[0] * top_k > self.num_experts and shared is None:
            # More choices than experts: grouped by expert, each expert's weights read once for all its rows;
            # up to ROWS_MAX tokens (a decode step's; a prompt's keep the layer's own matmuls).
            if x.shape[0] > cpu_gemv.ROWS_MAX:
                return None
            _check(call(lib.shoal_moe_tokens, "shoal_moe_tokens",
                        ctypes.addressof(self.gate_up), ctypes.addressof(self.down), self.num_experts, x.shape[0],
                        top_k, expert_ids.data_ptr(), weights.data_ptr(), x.data_ptr(), x.shape[1], self.inter,
                        out.data_ptr(), cpu_ops.DTYPES[x.dtype], threads or torch.get_num_threads(),
                        keep=(x, weights, expert_ids, out)), "MoE experts step")
            return out
        for t in range(x.shape[0]):
            _check(call(lib.shoal_moe_token, "shoal_moe_token",
                        ctypes.addressof(self.gate_up), ctypes.addressof(self.down), self.num_experts, top_k,
                        expert_ids.data_ptr() + t * top_k * 8, weights.data_ptr() + t * top_k * 4, shared_gate_up,
                        shared_down, x.data_ptr() + t * row, x.shape[1], self.inter, out.data_ptr() + t * row,
                        cpu_ops.DTYPES[x.dtype], threads or torch.get_num_threads(),
                        keep=(x, weights, expert_ids, out)), "MoE token step")
        return out
