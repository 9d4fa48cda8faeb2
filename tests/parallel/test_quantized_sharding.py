"""Quantized weights shard along the same dimensions as plain ones and reproduce the unsplit quantized
layer. The int8 per-output-channel format here mirrors shoal.quant's Int8ChannelWeight (qweight
[out, in] int8, scales [out]); shoal/quant/parallel.py registers shoal.quant's formats the same way,
tested at the end of this file."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from shoal.errors import WeightError
from shoal.parallel.layers import ColumnParallelLinear, RowParallelLinear, register_sharder, shard_value


@dataclass
class Int8Channel:
    qweight: torch.Tensor
    scales: torch.Tensor

    @classmethod
    def quantize(cls, w: torch.Tensor) -> "Int8Channel":
        scales = (w.abs().amax(dim=-1) / 127.0).clamp_min(1e-12)
        return cls(torch.round(w / scales[:, None]).clamp(-128, 127).to(torch.int8), scales)

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scales[:, None]


def _shard_int8(value: Int8Channel, dim: int, start: int, end: int) -> Int8Channel:
    # Output rows carry their scales with them; input columns share their row's scale.
    if dim == 0:
        return Int8Channel(value.qweight[start:end], value.scales[start:end])
    return Int8Channel(value.qweight[:, start:end], value.scales)


register_sharder(Int8Channel, _shard_int8)


class Int8RowParallel(RowParallelLinear):
    def before_split(self, loaded):
        return Int8Channel.quantize(loaded) if isinstance(loaded, torch.Tensor) else loaded


def test_column_split_of_int8_equals_quantizing_each_shard():
    torch.manual_seed(0)
    w = torch.randn(8, 6)
    whole = Int8Channel.quantize(w)
    for rank in range(2):
        shard = shard_value(whole, 0, rank * 4, rank * 4 + 4)
        alone = Int8Channel.quantize(w[rank * 4 : rank * 4 + 4])
        assert torch.equal(shard.qweight, alone.qweight) and torch.equal(shard.scales, alone.scales)


def test_row_split_of_int8_sums_to_the_unsplit_quantized_product():
    torch.manual_seed(0)
    w, x = torch.randn(5, 8), torch.randn(3, 8)
    layers = [Int8RowParallel(8, 5, False, rank, 2, group=None) for rank in range(2)]
    parts = [layer.before_split(w) for layer in layers]
    shards = [shard_value(p, 1, r * 4, r * 4 + 4) for r, p in enumerate(parts)]
    partial = sum(x[:, r * 4 : r * 4 + 4] @ s.dequantize().T for r, s in enumerate(shards))
    unsplit = x @ Int8Channel.quantize(w).dequantize().T
    assert (partial - unsplit).abs().max() < 1e-5
    # Quantizing each rank's columns on their own would pick other scales: not the unsplit model.
    naive = sum(x[:, r * 4 : r * 4 + 4] @ Int8Channel.quantize(w[:, r * 4 : r * 4 + 4]).dequantize().T
                for r in range(2))
    assert (naive - unsplit).abs().max() > 1e-4


def test_column_parallel_merged_layer_takes_each_part_per_rank():
    q, k = torch.arange(8.0)[:, None].expand(8, 3), 100 + torch.arange(4.0)[:, None].expand(4, 3)
    layer = ColumnParallelLinear(3, [8, 4], ("q_proj", "k_proj"), False, rank=1, size=2)
    layer.load_shard("weight", "q_proj", q, "q")
    layer.load_shard("weight", "k_proj", k, "k")
    assert layer.weight[:, 0].tolist() == [4, 5, 6, 7, 102, 103]


def test_unknown_weight_type_is_a_clear_error():
    with pytest.raises(WeightError, match="cannot split"):
        shard_value(object(), 0, 0, 1, "x.weight")


# ---- shoal.quant's own formats (registered by shoal/quant/parallel.py) ----------------------------------
def _int8_kernel():
    from shoal.backends.quantized_matmul import FALLBACK_KERNELS

    return FALLBACK_KERNELS["int8"]


def test_quantized_row_split_sums_to_the_unsplit_int8_layer():
    from shoal.quant.layers import QuantizedLinear
    from shoal.quant.parallel import QuantizedRowParallel

    torch.manual_seed(0)
    w, b, x = torch.randn(5, 8), torch.randn(5), torch.randn(3, 8)
    unsplit = QuantizedLinear("int8", 8, [5], None, True, _int8_kernel(), dtype=torch.float32)
    unsplit.load_weight("weight", w, "w")
    unsplit.load_weight("bias", b, "b")
    ranks = [QuantizedRowParallel("int8", 8, 5, True, r, 2, None, False, _int8_kernel(), dtype=torch.float32)
             for r in range(2)]
    for rank in ranks:
        rank.load_weight("weight", w, "w")
        rank.load_weight("bias", b, "b")
        assert torch.equal(rank.scales, unsplit.scales)  # each rank's scales are the whole row's
    partial = sum(rank.matmul(x[:, r * 4 : r * 4 + 4]) for r, rank in enumerate(ranks)) + b
    assert (partial - unsplit(x)).abs().max() < 1e-5


def test_int4_column_cut_on_group_boundaries_only():
    from shoal.errors import ConfigError
    from shoal.quant.formats import Int4GroupWeight

    torch.manual_seed(0)
    w = torch.randn(4, 128)
    whole = Int4GroupWeight.quantize(w, 32)
    part = shard_value(whole, 1, 64, 128)
    alone = Int4GroupWeight.quantize(w[:, 64:], 32)
    assert torch.equal(part.dequantize(), alone.dequantize())
    assert torch.equal(shard_value(whole, 0, 2, 4).dequantize(), whole.dequantize()[2:])
    with pytest.raises(ConfigError, match="group boundaries"):
        shard_value(whole, 1, 48, 96)


def test_fp8_cut_on_block_boundaries_only():
    from shoal.errors import ConfigError
    from shoal.quant.formats import Fp8BlockWeight

    torch.manual_seed(0)
    w = torch.randn(256, 256)
    whole = Fp8BlockWeight.quantize(w)
    for dim in (0, 1):
        part = shard_value(whole, dim, 128, 256)
        alone = Fp8BlockWeight.quantize(w.narrow(dim, 128, 128))
        assert torch.equal(part.dequantize(), alone.dequantize())
    with pytest.raises(ConfigError, match="block boundaries"):
        shard_value(whole, 0, 64, 128)


def test_quantized_splits_that_cut_groups_or_blocks_fail_before_starting(checkpoint):
    from shoal import LLM
    from shoal.errors import ConfigError

    # moe_intermediate_size 32 over 2 ranks: 16 inputs per rank, less than the smallest int4 group.
    with pytest.raises(ConfigError, match="not a whole number of groups; use a smaller --tp or --quant int8"):
        LLM(checkpoint("deepseek-v3")[0], device="cpu", tp=2, quant="int4", quant_group_size=32, progress=False)
    with pytest.raises(ConfigError, match="use --group-size 32"):
        LLM(checkpoint("llama")[0], device="cpu", tp=2, quant="int4", quant_group_size=64, progress=False)
    with pytest.raises(ConfigError, match="128 x 128 fp8 blocks"):
        LLM(checkpoint("llama")[0], device="cpu", tp=2, quant="fp8", progress=False)
