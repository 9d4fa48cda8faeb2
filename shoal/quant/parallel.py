"""Quantized weights under tensor and expert parallelism.

The formats teach `shoal.parallel.layers.shard_value` how they are cut (dim counts from the weight's
[out, in] layout):

  Int8ChannelWeight  dim 0: rows of qweight and their scales; dim 1: columns of qweight, every scale.
  Int4GroupWeight    dim 0: rows of packed, scales and zeros; dim 1: packed bytes and whole groups —
                     the cut must fall on a group boundary.
  Fp8BlockWeight     like int4 with 128 x 128 blocks: the cut must fall on a block boundary.

and the parallel layers get quantized stand-ins, swapped in by `quantized_parallel` (called from
`apply_plan` once the shard builder has split the model):

  QuantizedColumnParallel   this rank's rows of each merged part, stored in the format.
  QuantizedRowParallel      this rank's input columns. A float weight is quantized from the WHOLE row
                            first (`before_split`), so int8's per-row scale is the unsplit model's and
                            the partial sums add up to exactly what one process computes.
  QuantizedTensorParallelExperts / QuantizedPartitionedExperts   the same for routed experts.
  QuantizedVocabParallelEmbedding / QuantizedParallelLMHead      int8 per row: vocabulary rows split.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from shoal.errors import ConfigError, WeightError
from shoal.layers.moe import tokens_by_expert
from shoal.parallel.layers import (
    ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding, all_gather_cat, all_reduce,
    register_sharder, shard_value, vocab_range,
)
from shoal.parallel.moe import ExpertRange, PartitionedExperts, TensorParallelExperts
from shoal.quant.formats import FP8_BLOCK, Fp8BlockWeight, Int4GroupWeight, Int8ChannelWeight
from shoal.quant.layers import QuantizedEmbedding, QuantizedLinear, QuantizedStackedExperts, store, to_format


# ---- sharders -----------------------------------------------------------------------------------------
def _check_bounds(value, dim: int, start: int, end: int) -> None:
    size = value.shape[dim - 2]
    if end > size:
        raise WeightError(f"a {value.kind} weight has {size} entries along dim {dim} but the split needs {end}")


def shard_int8(value: Int8ChannelWeight, dim: int, start: int, end: int) -> Int8ChannelWeight:
    _check_bounds(value, dim, start, end)
    if dim == 0:
        return Int8ChannelWeight(value.qweight[..., start:end, :], value.scales[..., start:end])
    return Int8ChannelWeight(value.qweight[..., start:end], value.scales)  # a row's scale covers all its columns


def _aligned(kind: str, unit: int, what: str, size: int, start: int, end: int) -> None:
    if start % unit or (end % unit and end != size):
        raise ConfigError(
            f"cannot split a {kind} weight at {what} {start}..{end}: the split must fall on {kind} "
            f"{'group' if kind == 'int4' else 'block'} boundaries (multiples of {unit}); choose a smaller "
            f"{'--tp or --group-size' if kind == 'int4' else '--tp'}, or another --quant"
        )


def shard_int4(value: Int4GroupWeight, dim: int, start: int, end: int) -> Int4GroupWeight:
    _check_bounds(value, dim, start, end)
    if dim == 0:
        return value.rows(start, end)
    g = value.group_size
    _aligned("int4", g, "input", value.shape[-1], start, end)
    groups = slice(start // g, math.ceil(end / g))
    return Int4GroupWeight(value.packed[..., start // 2 : end // 2], value.scales[..., groups],
                           value.zeros[..., groups], g)


def shard_fp8(value: Fp8BlockWeight, dim: int, start: int, end: int) -> Fp8BlockWeight:
    _check_bounds(value, dim, start, end)
    blocks = slice(start // FP8_BLOCK, math.ceil(end / FP8_BLOCK))
    if dim == 0:
        _aligned("fp8", FP8_BLOCK, "output", value.shape[-2], start, end)
        return Fp8BlockWeight(value.weight[..., start:end, :], value.scale_inv[..., blocks, :])
    _aligned("fp8", FP8_BLOCK, "input", value.shape[-1], start, end)
    return Fp8BlockWeight(value.weight[..., start:end], value.scale_inv[..., blocks])


register_sharder(Int8ChannelWeight, shard_int8)
register_sharder(Int4GroupWeight, shard_int4)
register_sharder(Fp8BlockWeight, shard_fp8)


def check_local_input(fmt: str, local_in: int, full_in: int, size: int, group_size: int, name: str) -> None:
    """A row split hands each rank `local_in` inputs: int4 groups and fp8 blocks must not straddle ranks."""
    unit = group_size if fmt == "int4" else FP8_BLOCK if fmt == "fp8" else 1
    if local_in % unit:
        what = f"int4 group size {group_size}" if fmt == "int4" else f"the fp8 block size {FP8_BLOCK}"
        hint = "a smaller --tp or --group-size" if fmt == "int4" else "a smaller --tp or --quant int8"
        raise ConfigError(
            f"--tp {size} cuts the {full_in} inputs of {name} into {local_in} per rank, which {what} does not "
            f"divide; choose {hint}"
        )


def check_local_output(fmt: str, local_sizes: list[int], size: int, name: str) -> None:
    """A column split of fp8 weights must keep 128-row blocks whole on one rank."""
    if fmt == "fp8" and any(local % FP8_BLOCK for local in local_sizes):
        raise ConfigError(
            f"--tp {size} leaves {name} {'/'.join(map(str, local_sizes))} output rows per rank, which the fp8 block "
            f"size {FP8_BLOCK} does not divide; choose a smaller --tp or --quant int8"
        )


def in_format(fmt: str, loaded, group_size: int, scale_dtype: torch.dtype, name: str):
    """What a column split cuts: a float tensor as it is (quantizing rows commutes with cutting rows), a
    quantized value in another format (an fp8 checkpoint loaded as int8) converted whole first, as one
    process converts it."""
    return loaded if isinstance(loaded, torch.Tensor) else to_format(fmt, loaded, group_size, scale_dtype, name)


# ---- linear layers ------------------------------------------------------------------------------------
class QuantizedColumnParallel(QuantizedLinear):
    """ColumnParallelLinear with its weight in `fmt`: each merged part's [rank]-th rows."""

    def __init__(self, fmt: str, in_features: int, full_sizes: list[int], shard_names: tuple[str, ...] | None,
                 bias: bool, rank: int, size: int, kernel, group_size: int = 0, dtype=None, device=None) -> None:
        for full in full_sizes:
            if full % size:
                raise WeightError(f"a column split over {size} ranks needs output sizes divisible by it: {full_sizes}")
        super().__init__(fmt, in_features, [f // size for f in full_sizes], shard_names, bias, kernel, group_size,
                         dtype, device)
        self.rank, self.size = rank, size

    def _slice(self, index: int, loaded, name: str):
        local = self.out_sizes[index]
        loaded = in_format(self.fmt, loaded, self.group_size, self.scales.dtype, name)
        return shard_value(loaded, 0, self.rank * local, (self.rank + 1) * local, name)

    def load_weight(self, attr: str, loaded, name: str) -> None:
        super().load_weight(attr, self._slice(0, loaded, name), name)

    def load_shard(self, attr: str, shard: str, loaded, name: str) -> None:
        super().load_shard(attr, shard, self._slice(self.shard_names.index(shard), loaded, name), name)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}/{self.size}"


class QuantizedRowParallel(QuantizedLinear):
    """RowParallelLinear with its weight in `fmt`: this rank's input columns, partial sums all-reduced over
    `group` (unless `reduce` is False), the bias added once after."""

    def __init__(self, fmt: str, full_in: int, out_features: int, bias: bool, rank: int, size: int, group,
                 reduce: bool, kernel, group_size: int = 0, dtype=None, device=None) -> None:
        if full_in % size:
            raise WeightError(f"a row split over {size} ranks needs an input size divisible by it, got {full_in}")
        super().__init__(fmt, full_in // size, [out_features], None, bias, kernel, group_size, dtype, device)
        self.rank, self.size, self.group, self.reduce = rank, size, group, reduce

    def before_split(self, loaded, name: str = "weight"):
        """The whole weight in this layer's format: int8's per-row scales come from the whole row."""
        return to_format(self.fmt, loaded, self.group_size, self.scales.dtype, name)

    def load_weight(self, attr: str, loaded, name: str) -> None:
        if attr == "weight":
            local = self.in_features
            loaded = shard_value(self.before_split(loaded, name), 1, self.rank * local, (self.rank + 1) * local, name)
            store(self.fmt, self._tensors(""), (slice(None),), loaded, self.group_size, name)
        else:
            super().load_weight(attr, loaded, name)  # the bias, whole: added once, after the reduction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        if self.reduce:
            all_reduce(y, self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}/{self.size}, reduce={self.reduce}"


# ---- experts ------------------------------------------------------------------------------------------
class QuantizedTensorParallelExperts(QuantizedStackedExperts):
    """Every expert's [rank]-th slice of the intermediate dimension, in `fmt`."""

    def __init__(self, fmt: str, num_experts: int, hidden_size: int, full_intermediate: int, rank: int, size: int,
                 kernel, group_size: int = 0, dtype=None, device=None) -> None:
        super().__init__(fmt, num_experts, hidden_size, full_intermediate // size, kernel, group_size, dtype, device)
        self.rank = rank

    def load_expert(self, index: int, shard: str, loaded, name: str) -> None:
        inter = self.intermediate_size
        start, end = self.rank * inter, (self.rank + 1) * inter
        if shard == "down_proj":  # a row split: quantize the whole row first, as QuantizedRowParallel does
            whole = to_format(self.fmt, loaded, self.group_size, self.down_scales.dtype, name)
            loaded = shard_value(whole, 1, start, end, name)
        else:
            loaded = shard_value(in_format(self.fmt, loaded, self.group_size, self.gate_up_scales.dtype, name), 0,
                                 start, end, name)
        super().load_expert(index, shard, loaded, name)


class QuantizedPartitionedExperts(ExpertRange, QuantizedStackedExperts):
    """Experts [first, first + count) of the layer in `fmt`; other experts' tensors are skipped."""

    def __init__(self, fmt: str, total_experts: int, first: int, count: int, hidden_size: int,
                 intermediate_size: int, kernel, group_size: int = 0, dtype=None, device=None) -> None:
        super().__init__(fmt, count, hidden_size, intermediate_size, kernel, group_size, dtype, device)
        self.total_experts, self.first = total_experts, first

    def run(self, rows: torch.Tensor, local_expert: torch.Tensor) -> torch.Tensor:
        """Each row through its (local) expert, unweighted."""
        weights = self.expert_weights()
        out = torch.empty_like(rows)
        for expert, index, _ in tokens_by_expert(torch.ones(len(rows)), local_expert[:, None], self.num_experts):
            gate_up, down = weights[expert]
            gate, up = self.kernel(rows[index], gate_up, self.group_size).chunk(2, dim=-1)
            out[index] = self.kernel(nn.functional.silu(gate) * up, down, self.group_size).to(rows.dtype)
        return out


# ---- vocabulary ---------------------------------------------------------------------------------------
def _load_vocab_rows(tensors: dict[str, torch.Tensor], start: int, end: int, loaded, name: str) -> None:
    rows = end - start
    with torch.no_grad():
        for tensor in tensors.values():
            tensor[rows:].zero_()  # the last rank's padding: zero logits, never looked up
    loaded = shard_value(in_format("int8", loaded, 0, tensors["scales"].dtype, name), 0, start, end, name)
    store("int8", {k: v[:rows] for k, v in tensors.items()}, (slice(None),), loaded, 0, name)


class QuantizedVocabParallelEmbedding(QuantizedEmbedding):
    """VocabParallelEmbedding with an int8 per-row table."""

    def __init__(self, vocab_size: int, hidden_size: int, rank: int, size: int, group, kernel, dtype=None,
                 device=None) -> None:
        self.start, self.end, per = vocab_range(vocab_size, rank, size)
        super().__init__(per, hidden_size, kernel, dtype, device)
        self.vocab_size, self.size, self.group = vocab_size, size, group

    def load_weight(self, attr: str, loaded, name: str) -> None:
        if attr != "weight":
            raise WeightError(f"checkpoint tensor {name} has no place in an int8 embedding")
        _load_vocab_rows({"qweight": self.qweight, "scales": self.scales}, self.start, self.end, loaded, name)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        inside = (token_ids >= self.start) & (token_ids < self.end)
        local = torch.where(inside, token_ids - self.start, 0)
        out = super().forward(local) * inside[..., None].to(self.dtype)
        return all_reduce(out, self.group)

    def gathered_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return all_gather_cat(self.logits(hidden), self.group, self.size)[..., : self.vocab_size]


class QuantizedParallelLMHead(QuantizedLinear):
    """ParallelLMHead with int8 per-row weights: this rank's vocabulary rows, logits all-gathered."""

    def __init__(self, vocab_size: int, hidden_size: int, rank: int, size: int, group, kernel, dtype=None,
                 device=None) -> None:
        self.start, self.end, per = vocab_range(vocab_size, rank, size)
        super().__init__("int8", hidden_size, [per], None, False, kernel, 0, dtype, device)
        self.vocab_size, self.size, self.group = vocab_size, size, group

    def load_weight(self, attr: str, loaded, name: str) -> None:
        if attr != "weight":
            raise WeightError(f"checkpoint tensor {name} has no place in an int8 output head")
        _load_vocab_rows({"qweight": self.qweight, "scales": self.scales}, self.start, self.end, loaded, name)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return all_gather_cat(super().forward(hidden), self.group, self.size)[..., : self.vocab_size]


class TiedQuantizedParallelHead(nn.Module):
    """The output head of a model with tied embeddings, split by vocabulary: reads the int8 table."""

    def __init__(self, embedding: QuantizedVocabParallelEmbedding) -> None:
        super().__init__()
        self.tied_to = [embedding]  # a list, so the embedding is not registered twice

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.tied_to[0].gathered_logits(hidden)


# ---- the swap -----------------------------------------------------------------------------------------
def quantized_parallel(module: nn.Module, name: str, plan, kernel, int8_kernel, dtype, device,
                       replaced: dict[int, nn.Module]) -> nn.Module | None:
    """The quantized stand-in for a parallel layer under `plan`; None when `module` is not one (or the
    plan keeps it dense)."""
    fmt, group_size = plan.fmt, plan.group_size
    if fmt and isinstance(module, ColumnParallelLinear):
        check_local_output(fmt, module.out_sizes, module.size, name)
        names = None if module.shard_names == ("",) else module.shard_names
        return QuantizedColumnParallel(fmt, module.in_features, [s * module.size for s in module.out_sizes], names,
                                       module.bias is not None, module.rank, module.size, kernel, group_size,
                                       dtype, device)
    if fmt and isinstance(module, RowParallelLinear):
        full_in = module.in_features * module.size
        check_local_input(fmt, module.in_features, full_in, module.size, group_size, name)
        return QuantizedRowParallel(fmt, full_in, module.out_features, module.bias is not None, module.rank,
                                    module.size, module.group, module.reduce, kernel, group_size, dtype, device)
    if fmt and isinstance(module, TensorParallelExperts):
        size = module.size
        hidden, inter = module.gate_up.shape[-1], module.intermediate_size
        check_local_input(fmt, inter, inter * size, size, group_size, f"{name} (down)")
        check_local_output(fmt, [inter], size, f"{name} (gate/up)")
        return QuantizedTensorParallelExperts(fmt, module.num_experts, hidden, inter * size, module.rank, size,
                                              kernel, group_size, dtype, device)
    if fmt and isinstance(module, PartitionedExperts):
        return QuantizedPartitionedExperts(fmt, module.total_experts, module.first, module.num_experts,
                                           module.gate_up.shape[-1], module.intermediate_size, kernel, group_size,
                                           dtype, device)
    if plan.quantize_embeddings and isinstance(module, VocabParallelEmbedding):
        return QuantizedVocabParallelEmbedding(module.vocab_size, module.weight.shape[1], module.rank, module.size,
                                               module.group, int8_kernel, dtype, device)
    if plan.quantize_embeddings and isinstance(module, ParallelLMHead):
        if module.tied_to is not None:
            return TiedQuantizedParallelHead(replaced[id(module.tied_to)])
        return QuantizedParallelLMHead(module.vocab_size, module.weight.shape[1], module.rank, module.size,
                                       module.group, int8_kernel, dtype, device)
    return None
