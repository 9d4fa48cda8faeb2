"""Tensor-parallel layers: each holds only its rank's slice of a weight, cut from the checkpoint tensor
as it loads, and does the one collective its split needs.

  ColumnParallelLinear  output rows split (q/k/v heads, gate/up, MLA's q_b / kv_b): no collective;
                        a merged layer splits each of its parts, so q, k and v stay aligned per rank.
  RowParallelLinear     input columns split (o_proj, down_proj): partial sums, one all-reduce.
  VocabParallelEmbedding / ParallelLMHead  vocabulary rows split: masked lookup + all-reduce; local
                        logits + all-gather.

Weight formats shard along the same dimensions through `shard_value`: a plain tensor is narrowed; a
quantized weight type registers how (`register_sharder`, done by shoal/quant/parallel.py, which also
holds the quantized variants of these layers): per-output-channel scales go with the rows of a
column split and stay whole in a row split; group scales follow the input columns of a row split
(see `RowParallelLinear.before_split` for why a row split quantizes the whole weight first). These
plain layers dequantize a quantized checkpoint value whole before cutting it (`dense`).
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from shoal.errors import WeightError
from shoal.layers.embedding import LMHead, VocabEmbedding
from shoal.layers.linear import Linear, MergedLinear, copy_weight

# type -> fn(value, dim, start, end) returning the slice; dim counts from the weight's [out, in] layout.
_SHARDERS: dict[type, Callable] = {}


def register_sharder(cls: type, fn: Callable) -> None:
    """Teach `shard_value` a weight format (e.g. an int8 per-channel weight: qweight and scales)."""
    _SHARDERS[cls] = fn


def shard_value(value, dim: int, start: int, end: int, name: str = "weight"):
    """The [start, end) slice along `dim` of a checkpoint value (a tensor or a registered format)."""
    if isinstance(value, torch.Tensor):
        if value.shape[dim] < end:
            raise WeightError(
                f"weight {name} has {value.shape[dim]} entries along dim {dim} in the checkpoint but the split "
                f"needs {end}; config.json and the weights disagree"
            )
        return value.narrow(dim, start, end - start)
    for cls in type(value).__mro__:
        if cls in _SHARDERS:
            return _SHARDERS[cls](value, dim, start, end)
    raise WeightError(f"weight {name} is a {type(value).__name__}, which shoal cannot split across ranks yet")


def dense(value):
    """A checkpoint value for a layer that stores plain tensors: a quantized one (an fp8 checkpoint on a
    device without fp8, MLA's kv_b_proj) is dequantized whole before it is cut, as one process would."""
    return value if isinstance(value, torch.Tensor) else value.dequantize(torch.float32)


# Payload bytes this process has put into each kind of collective (the benchmark reads it).
COLLECTIVE_BYTES: Counter = Counter()


def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    dist.all_reduce(x, group=group)
    COLLECTIVE_BYTES["all_reduce"] += x.numel() * x.element_size()
    return x


def all_gather_cat(x: torch.Tensor, group, size: int, dim: int = -1) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    COLLECTIVE_BYTES["all_gather"] += x.numel() * x.element_size()
    return torch.cat(parts, dim=dim)


class ColumnParallelLinear(MergedLinear):
    """This rank's rows of every part of a (merged) linear layer; the full sizes are `full_sizes`."""

    def __init__(self, in_features: int, full_sizes: list[int], shard_names: tuple[str, ...] | None,
                 bias: bool, rank: int, size: int) -> None:
        for full in full_sizes:
            if full % size:
                raise WeightError(f"a column split over {size} ranks needs output sizes divisible by it: {full_sizes}")
        super().__init__(in_features, [f // size for f in full_sizes], shard_names or ("",), bias)
        self.rank, self.size = rank, size

    @classmethod
    def from_linear(cls, module: Linear, rank: int, size: int) -> ColumnParallelLinear:
        merged = isinstance(module, MergedLinear)
        return cls(module.in_features, module.out_sizes if merged else [module.out_features],
                   module.shard_names if merged else None, module.bias is not None, rank, size)

    def _slice(self, index: int, loaded, name: str):
        local = self.out_sizes[index]
        return shard_value(dense(loaded), 0, self.rank * local, (self.rank + 1) * local, name)

    def load_shard(self, param_name: str, shard: str, loaded, full_name: str) -> None:
        index = self.shard_names.index(shard)
        super().load_shard(param_name, shard, self._slice(index, loaded, full_name), full_name)

    def load_weight(self, param_name: str, loaded, full_name: str) -> None:
        copy_weight(getattr(self, param_name), self._slice(0, loaded, full_name), full_name)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}/{self.size}"


class RowParallelLinear(Linear):
    """This rank's input columns; outputs are partial sums, all-reduced over `group` unless `reduce`
    is False (a caller that adds several partial sums first, then reduces once)."""

    def __init__(self, full_in: int, out_features: int, bias: bool, rank: int, size: int, group,
                 reduce: bool = True) -> None:
        if full_in % size:
            raise WeightError(f"a row split over {size} ranks needs an input size divisible by it, got {full_in}")
        super().__init__(full_in // size, out_features, bias)
        self.rank, self.size, self.group, self.reduce = rank, size, group, reduce

    @classmethod
    def from_linear(cls, module: Linear, rank: int, size: int, group, reduce: bool = True) -> RowParallelLinear:
        return cls(module.in_features, module.out_features, module.bias is not None, rank, size, group, reduce)

    def before_split(self, loaded):
        """Hook for weight formats whose scales span a whole row (int8 per output channel): they must be
        quantized from the whole row before the columns are cut, or each rank would pick its own scale."""
        return loaded

    def load_weight(self, param_name: str, loaded, full_name: str) -> None:
        if param_name == "bias":  # added once, after the reduction
            copy_weight(self.bias, loaded, full_name)
            return
        local = self.in_features
        value = shard_value(self.before_split(dense(loaded)), 1, self.rank * local, (self.rank + 1) * local, full_name)
        copy_weight(self.weight, value, full_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight)
        if self.reduce:
            all_reduce(y, self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}/{self.size}, reduce={self.reduce}"


def vocab_range(vocab_size: int, rank: int, size: int) -> tuple[int, int, int]:
    """(first id, end id, rows per rank): rows per rank is rounded up; the last rank pads with zeros."""
    per = -(-vocab_size // size)
    return min(rank * per, vocab_size), min((rank + 1) * per, vocab_size), per


class VocabRows:
    """This rank's rows [start, end) of a vocabulary-sized weight; rows past the vocabulary's end (the
    last rank's padding) stay zero."""

    def load_weight(self, param_name: str, loaded, full_name: str) -> None:
        rows = self.end - self.start
        with torch.no_grad():
            self.weight[rows:].zero_()
        copy_weight(self.weight[:rows], shard_value(dense(loaded), 0, self.start, self.end, full_name), full_name)


class VocabParallelEmbedding(VocabRows, VocabEmbedding):
    def __init__(self, vocab_size: int, hidden_size: int, rank: int, size: int, group) -> None:
        self.start, self.end, per = vocab_range(vocab_size, rank, size)
        super().__init__(per, hidden_size)
        self.vocab_size, self.rank, self.size, self.group = vocab_size, rank, size, group

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        inside = (token_ids >= self.start) & (token_ids < self.end)
        local = torch.where(inside, token_ids - self.start, 0)
        out = nn.functional.embedding(local, self.weight) * inside[..., None].to(self.weight.dtype)
        return all_reduce(out, self.group)


class ParallelLMHead(VocabRows, LMHead):
    """This rank's vocabulary rows; logits are gathered so every rank of the stage has all of them."""

    def __init__(self, vocab_size: int, hidden_size: int, rank: int, size: int, group,
                 tied_to: VocabParallelEmbedding | None = None) -> None:
        self.start, self.end, per = vocab_range(vocab_size, rank, size)
        super().__init__(per, hidden_size, tied_to)
        self.vocab_size, self.rank, self.size, self.group = vocab_size, rank, size, group

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = super().forward(hidden)
        return all_gather_cat(local, self.group, self.size)[..., : self.vocab_size]
