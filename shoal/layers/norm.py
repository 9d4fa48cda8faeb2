"""RMSNorm, the only normalisation the supported families use."""

from __future__ import annotations

import torch
from torch import nn

from shoal.backends.cpu import fused as cpu_ops


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with `residual`, (norm(x + residual), x + residual): the decoder's residual add and
        the norm after it in one pass (one fused call on the CPU)."""
        if (
            x.dtype == self.weight.dtype
            and cpu_ops.accepts(x)
            and (residual is None or (residual.dtype == x.dtype and residual.shape == x.shape and residual.is_contiguous()))
        ):
            out, summed = cpu_ops.rms_norm(x, self.weight, self.eps, residual)
            return out if residual is None else (out, summed)
        if residual is not None:
            summed = x + residual
            return self._norm(summed), summed
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and cast back before the weight, as the reference implementations do,
        # so low-precision runs round at the same place.
        dtype = x.dtype
        # One fused op instead of five (pow, mean, add, rsqrt, mul): the same values, fewer dispatches.
        x32 = nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * x32.to(dtype)
