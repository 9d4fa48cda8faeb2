"""The operations layers call, chosen by the backend once when a model is built.

`Ops` is the plain-torch reference of each operation: correct on every device, and the ground truth a
backend's faster version is tested against. A backend hands out its own subclass from `Backend.ops()`,
overriding the operations its chip does faster (the CPU its C kernels, an NPU torch_npu's fused ops);
`bind_ops` gives that instance to every module of a freshly built model, so a layer calls `self.ops.X`
and never asks which device it runs on. Attention's prefill and the quantized matmuls are chosen the
same way, through `Backend.attention_fn` and `Backend.linear_fn`.

An operation a backend cannot take for given inputs (a dtype its kernel lacks, say) falls back to the
reference itself: `super().rms_norm(...)`.
"""

from __future__ import annotations

import os

import torch
from torch import nn

# What EngineConfig.cpu_kernels may say: a backend's own kernels where they are faster on this machine,
# its own wherever they are built (to test them, or to measure), or PyTorch's alone.
KERNEL_CHOICES = ("auto", "shoal", "torch")
# What EngineConfig.cpu_isa may say: the instruction-set cap of the CPU backend's kernels
# (shoal/backends/cpu/isa.py); other backends ignore it.
ISA_LEVELS = ("native", "avx512", "avx2", "dotprod", "neon", "portable")  # x86 and ARM ones: cpu/isa.py


def default_kernels() -> str:
    """The choice when none is given: "torch" when SHOAL_CPU_KERNELS says 0 / false / no / off."""
    off = os.environ.get("SHOAL_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off")
    return "torch" if off else "auto"


class Ops:
    """The reference operations (plain torch). Subclass and override to bring a chip's own kernels."""

    name = "torch"

    # ---- norms and activations ---------------------------------------------------------------
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
        """weight * dtype(rms_norm(float32(s))) with s = x (+ residual): norm(x), or with `residual` the
        pair (norm(x + residual), x + residual): the decoder's residual add and the norm after it."""
        if residual is not None:
            summed = x + residual
            return self._norm(summed, weight, eps), summed
        return self._norm(x, weight, eps)

    @staticmethod
    def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # Normalise in float32 and cast back before the weight, as the reference implementations do,
        # so low-precision runs round at the same place.
        x32 = nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=eps)
        return weight * x32.to(x.dtype)

    def head_rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, heads: int) -> torch.Tensor:
        """x [rows, heads * dim] -> each head's dim values RMS-normed with weight [dim] (per-head query and
        key norms), contiguous [rows, heads * dim]."""
        rows = x.shape[0]
        return self._norm(x.reshape(rows, heads, -1), weight, eps).reshape(rows, -1)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x + y: the decoder's residual add, and a bias ([n], broadcast over x's rows)."""
        return x + y

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up [..., 2 * inter] (gate then up) -> silu(gate) * up [..., inter]."""
        gate, up = gate_up.chunk(2, dim=-1)
        return nn.functional.silu(gate) * up

    def sigmoid_gate(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """x [rows, n] scaled by sigmoid(gate [rows, 1]): Qwen2-MoE's gated shared expert."""
        return torch.sigmoid(gate) * x

    # ---- matmuls -------------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               prepared=None) -> torch.Tensor:
        """x W^T (+ b) for a full-precision weight; `prepared` is what `prepare_weights` made of it (None
        here)."""
        return nn.functional.linear(x, weight, bias)

    def prepare_weights(self, model: nn.Module) -> int:
        """Once the weights are loaded: re-lay full-precision weights for this device's matmuls (setting
        each Linear's `prepared`); returns the bytes it added. The reference keeps them as they are."""
        return 0

    # ---- decode attention over the cache ------------------------------------------------------------
    def decode_attention(self, positions: torch.Tensor, slot_mapping: torch.Tensor, context_slots: torch.Tensor,
                         context_lens: torch.Tensor, sliding_window: int | None, pool: torch.Tensor):
        """For a step of one new token per sequence: an object that writes this step's keys and values
        and attends over each sequence's cached context in one call per layer (`__call__` for grouped-
        query attention, `.mla` for MLA's absorbed form; see backends/cpu/fused.py's DecodeAttention), or
        None, and the layers run their torch path (cache.write, then `Backend.attention_fn`)."""
        return None

    # ---- mixture of experts --------------------------------------------------------------------------
    def moe_route(self, x: torch.Tensor, weight: torch.Tensor, top_k: int, sigmoid: bool, bias: torch.Tensor | None,
                  norm: bool, scaling: float, load: torch.Tensor | None = None, groups: int = 1,
                  topk_groups: int = 1, group_method: str | None = None):
        """A router in one call: (weights float32, expert ids) [tokens, top_k], the choices counted into
        `load`; group_method ("group_limited_greedy", "noaux_tc") limits the choice to the best topk_groups
        of `groups` expert groups. None, and the router runs its torch code (layers/moe.py)."""
        return None

    def token_experts(self, fmt: str | None, kernel: str | None, experts: list[tuple[dict, dict]], group_size: int,
                      dtype: torch.dtype):
        """A callable (x [tokens, hidden], weights, expert ids[, shared]) -> each token's weighted expert sum
        (or None for inputs it does not take), the step's experts in as few calls as the backend can, built
        once for a layer's experts; None where this backend has none (the experts then run one by one)."""
        return None

    # ---- capture ---------------------------------------------------------------------------------
    def step_graphs(self):
        """A callable (cache, x, step, forward) -> forward(x) that turns a decode step (one new token per
        sequence; `step` is this step's decode_attention) into one call where the device can — CUDA graphs,
        an NPU's graph mode, the CPU's record and replay — knowing the ops, never the model; or None, and
        every step runs eagerly. Made once per model (CausalLM.forward)."""
        return None

    # ---- sampling ----------------------------------------------------------------------------------
    def argmax(self, scores: torch.Tensor) -> torch.Tensor:
        """Each row's first maximum, as argmax (max().indices: ~1.7x faster than argmax on the CPU)."""
        return scores.max(dim=-1).indices


REFERENCE = Ops()


def bind_ops(model: nn.Module, ops: Ops) -> None:
    """Give `ops` to every module of `model` that calls operations (those with an `ops` attribute)."""
    for module in model.modules():
        if isinstance(getattr(module, "ops", None), Ops):
            module.ops = ops
