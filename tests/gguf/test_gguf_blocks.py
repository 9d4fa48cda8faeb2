"""Q8_0 / Q4_0 as raw 32-element blocks (the layout shoal's int8 / int4 group-32 formats take) agree with
gguf.quants.dequantize, and llama.cpp's q/k row permutation can be undone on the blocks themselves."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from shoal.errors import WeightError
from shoal.gguf import GGUFFile, q4_0_blocks, q8_0_blocks
from shoal.gguf.dequant import dequantize_q4_0, dequantize_q8_0, to_torch
from shoal.gguf.names import unpermute_rows

from hf_to_gguf import permute


@pytest.fixture
def weight():
    return np.random.default_rng(0).standard_normal((48, 96)).astype(np.float32)


def test_q8_0_blocks_are_int8_values_and_one_scale_per_32(weight):
    raw = gguf.quants.quantize(weight, T.Q8_0)
    values, scales = q8_0_blocks(raw)
    assert values.dtype == torch.int8 and values.shape == (48, 96)
    assert scales.dtype == torch.float16 and scales.shape == (48, 3)
    expected = torch.from_numpy(gguf.quants.dequantize(raw, T.Q8_0))
    rebuilt = (values.float().view(48, 3, 32) * scales.float()[..., None]).view(48, 96)
    assert torch.equal(rebuilt, expected)
    assert torch.equal(dequantize_q8_0(raw), expected)
    assert (rebuilt - torch.from_numpy(weight)).abs().max() < 0.05


def test_q4_0_blocks_are_4_bit_values_with_zero_point_8(weight):
    raw = gguf.quants.quantize(weight, T.Q4_0)
    values, scales, zero = q4_0_blocks(raw)
    assert values.dtype == torch.uint8 and values.shape == (48, 96) and int(values.max()) <= 15
    assert scales.shape == (48, 3) and zero == 8
    expected = torch.from_numpy(gguf.quants.dequantize(raw, T.Q4_0))
    rebuilt = ((values.float() - zero).view(48, 3, 32) * scales.float()[..., None]).view(48, 96)
    assert torch.equal(rebuilt, expected)
    assert torch.equal(dequantize_q4_0(raw), expected)


def test_unpermuting_blocks_equals_unpermuting_the_dequantized_weight(weight):
    raw = gguf.quants.quantize(permute(weight, 4), T.Q8_0)
    values, scales = q8_0_blocks(raw)
    direct = unpermute_rows(dequantize_q8_0(raw), 4)
    v, s = unpermute_rows(values, 4), unpermute_rows(scales, 4)
    assert torch.equal((v.float().view(48, 3, 32) * s.float()[..., None]).view(48, 96), direct)
    # and the permutation really is undone on float weights
    assert torch.equal(unpermute_rows(torch.from_numpy(permute(weight, 4)), 4), torch.from_numpy(weight))


def test_blocks_of_a_stacked_expert_tensor_in_a_file(tmp_path):
    stacked = np.random.default_rng(1).standard_normal((3, 8, 64)).astype(np.float32)
    writer = gguf.GGUFWriter(str(tmp_path / "e.gguf"), "llama")
    for name, qtype in (("q8", T.Q8_0), ("q4", T.Q4_0)):
        writer.add_tensor(name, gguf.quants.quantize(stacked, qtype), raw_dtype=qtype)
    writer.add_tensor("bf", gguf.quants.quantize(stacked, T.BF16), raw_dtype=T.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    file = GGUFFile(tmp_path / "e.gguf")
    assert file.tensors["q8"].shape == (3, 8, 64)
    values, scales = q8_0_blocks(file.raw("q8"))
    assert values.shape == (3, 8, 64) and scales.shape == (3, 8, 2)
    assert torch.equal(to_torch("Q8_0", file.raw("q8"), (3, 8, 64)), torch.from_numpy(gguf.quants.dequantize(file.raw("q8"), T.Q8_0)))
    values, scales, _ = q4_0_blocks(file.raw("q4")[1])  # one expert's slice
    assert values.shape == (8, 64) and scales.shape == (8, 2)
    bf16 = to_torch("BF16", file.raw("bf"), (3, 8, 64))
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, torch.from_numpy(stacked).bfloat16())


def test_blocks_refuse_data_of_the_wrong_layout():
    with pytest.raises(WeightError, match="34-byte blocks"):
        q8_0_blocks(np.zeros((2, 35), dtype=np.uint8))
    with pytest.raises(WeightError, match="18-byte blocks"):
        q4_0_blocks(np.zeros((2, 18), dtype=np.float32))
