"""Linear layers that know how their weights load: plain, and merged (several checkpoint matrices
stored as one, e.g. q/k/v or gate/up, so one matmul reads them all).

Quantized and tensor-parallel variants replace these classes without touching model code; the
model only says which checkpoint names map to which slice (see `MergedLinear.shard_names`).
"""

from __future__ import annotations

import torch
from torch import nn

from shoal.backends.ops import REFERENCE, Ops
from shoal.errors import WeightError


def copy_weight(param: torch.Tensor, loaded: torch.Tensor, name: str) -> None:
    """Copy a checkpoint tensor into a parameter, converting dtype, after checking the shape.

    `loaded` may be a quantized weight (shoal.quant.formats) arriving at a full-precision parameter:
    it is dequantized first (an fp8 checkpoint on a device without fp8, MLA's kv_b_proj).
    """
    if not isinstance(loaded, torch.Tensor):
        loaded_shape = tuple(loaded.shape)
        if loaded_shape == tuple(param.shape):
            loaded = loaded.dequantize(torch.float32)
    if tuple(param.shape) != tuple(loaded.shape):
        raise WeightError(
            f"weight {name} has shape {tuple(loaded.shape)} in the checkpoint but the model expects "
            f"{tuple(param.shape)}; config.json and the weights disagree"
        )
    with torch.no_grad():
        param.copy_(loaded)


class Linear(nn.Module):
    """y = x W^T (+ b), with W stored [out_features, in_features] as in Hugging Face checkpoints.
    `prepared`: the weight re-laid for the backend's matmul after loading (Ops.prepare_weights; on the
    CPU a float32 weight packed for MKL), or None."""

    ops: Ops = REFERENCE  # the backend's, once the model is built
    prepared = None

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # torch.empty: every value is overwritten by the loader, so spend no time initialising.
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(x, self.weight, self.bias, self.prepared)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dimension.

    `shard_names` are the checkpoint names of the parts in order (e.g. ("q_proj", "k_proj", "v_proj"));
    the loader calls `load_shard` once per part.
    """

    def __init__(self, in_features: int, out_sizes: list[int], shard_names: tuple[str, ...], bias: bool = False):
        super().__init__(in_features, sum(out_sizes), bias)
        self.out_sizes = list(out_sizes)
        self.shard_names = shard_names
        offsets = [0]
        for size in out_sizes:
            offsets.append(offsets[-1] + size)
        self._offsets = offsets

    def load_shard(self, param_name: str, shard: str, loaded: torch.Tensor, full_name: str) -> None:
        index = self.shard_names.index(shard)
        start, end = self._offsets[index], self._offsets[index + 1]
        target = getattr(self, param_name)
        copy_weight(target[start:end], loaded, full_name)

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(y, self.out_sizes, dim=-1))
