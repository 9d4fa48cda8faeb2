"""The gated SiLU feed-forward block (SwiGLU) shared by Llama, Qwen, Mistral and DeepSeek's dense layers."""

from __future__ import annotations

import torch
from torch import nn

from shoal.backends.ops import REFERENCE, Ops
from shoal.layers.linear import Linear, MergedLinear


class GatedMLP(nn.Module):
    ops: Ops = REFERENCE  # the backend's, once the model is built

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(
            hidden_size, [intermediate_size, intermediate_size], ("gate_proj", "up_proj"), bias=bias
        )
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_mul(self.gate_up_proj(x)))  # gate and up are the two halves
