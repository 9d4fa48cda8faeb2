"""The gated SiLU feed-forward block (SwiGLU) shared by Llama, Qwen, Mistral and DeepSeek's dense layers."""

from __future__ import annotations

import torch
from torch import nn

from shoal.backends.cpu import fused as cpu_ops
from shoal.layers.linear import Linear, MergedLinear


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(
            hidden_size, [intermediate_size, intermediate_size], ("gate_proj", "up_proj"), bias=bias
        )
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if cpu_ops.accepts(gate_up):
            return self.down_proj(cpu_ops.silu_mul(gate_up))  # gate and up are the two halves
        gate, up = self.gate_up_proj.split(gate_up)
        return self.down_proj(nn.functional.silu(gate) * up)
