"""RMSNorm, the only normalisation the supported families use."""

from __future__ import annotations

import torch
from torch import nn

from shoal.backends.ops import REFERENCE, Ops


class RMSNorm(nn.Module):
    ops: Ops = REFERENCE  # the backend's, once the model is built (shoal.backends.ops.bind_ops)

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with `residual`, (norm(x + residual), x + residual): the decoder's residual add and
        the norm after it in one pass (one fused call where the backend has one)."""
        return self.ops.rms_norm(x, self.weight, self.eps, residual)

    def heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """x [rows, heads * size] (rows may be strided) -> each head's values normed (per-head q / k norms),
        contiguous [rows, heads * size]."""
        return self.ops.head_rms_norm(x, self.weight, self.eps, heads)
