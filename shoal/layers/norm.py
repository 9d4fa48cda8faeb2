"""RMSNorm, the only normalisation the supported families use."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and cast back before the weight, as the reference implementations do,
        # so low-precision runs round at the same place.
        dtype = x.dtype
        # One fused op instead of five (pow, mean, add, rsqrt, mul): the same values, fewer dispatches.
        x32 = nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * x32.to(dtype)
