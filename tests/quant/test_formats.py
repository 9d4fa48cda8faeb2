"""The weight formats: round-trip error bounds, exact construction from external layouts, int32 packing."""

from __future__ import annotations

import pytest
import torch

from shoal.quant.checkpoint import pack_int32, unpack_int32
from shoal.quant.formats import Fp8BlockWeight, Int4GroupWeight, Int8ChannelWeight


def _weight(out=48, n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, n, generator=g) * torch.rand(out, 1, generator=g)


def test_int8_channel_round_trip_within_half_a_step():
    w = _weight()
    q = Int8ChannelWeight.quantize(w)
    assert q.qweight.dtype == torch.int8 and q.scales.shape == (48,)
    err = (q.dequantize() - w).abs()
    assert (err <= q.scales[:, None] / 2 + 1e-7).all()
    assert torch.equal(q.rows(8, 16).qweight, q.qweight[8:16])


def test_int4_group_round_trip_within_half_a_step():
    w = _weight()
    for group in (32, 64, 128):
        q = Int4GroupWeight.quantize(w, group)
        assert q.packed.dtype == torch.uint8 and q.packed.shape == (48, 128) and q.shape == (48, 256)
        step = q.scales.repeat_interleave(group, dim=1)
        assert ((q.dequantize() - w).abs() <= step / 2 + 1e-6).all()
        assert q.unpacked().max() <= 15


def test_int4_from_external_uint4_layouts_is_exact():
    g = torch.Generator().manual_seed(1)
    u = torch.randint(0, 16, (16, 64), generator=g)
    d = torch.rand(16, 2, generator=g)
    # GGUF Q4_0: w = (u - 8) * d
    q40 = Int4GroupWeight.from_uint4(u, d, 32)
    expected = (u.float() - 8) * d.repeat_interleave(32, 1)
    assert torch.allclose(q40.dequantize(), expected, atol=1e-6)
    # GGUF Q4_1: w = u * d + m
    m = torch.randn(16, 2, generator=g)
    q41 = Int4GroupWeight.from_uint4(u, d, 32, offsets=m)
    assert torch.allclose(q41.dequantize(), u.float() * d.repeat_interleave(32, 1) + m.repeat_interleave(32, 1), atol=1e-5)
    # integer zero point per group (compressed-tensors, GPTQ): w = (u - z) * s
    z = torch.randint(0, 16, (16, 2), generator=g)
    qz = Int4GroupWeight.from_uint4(u, d, 32, zero_point=z)
    assert torch.allclose(qz.dequantize(), (u - z.repeat_interleave(32, 1)).float() * d.repeat_interleave(32, 1), atol=1e-5)
    assert torch.equal(qz.zero_points(), z.float())
    # packing: input 2j in the low nibble
    assert q40.packed[0, 0] == u[0, 0] | (u[0, 1] << 4)


def test_fp8_block_round_trip_and_block_layout():
    w = _weight(out=200, n=300)
    q = Fp8BlockWeight.quantize(w)
    assert q.weight.dtype == torch.float8_e4m3fn and q.scale_inv.shape == (2, 3)
    # e4m3 keeps 3 mantissa bits: relative error at most 1/16 of the value (plus subnormals near zero)
    err = (q.dequantize() - w).abs()
    assert (err <= w.abs() / 16 + q.block_scales() * 2**-9).all()
    blocks = w[:128, :128].abs().max() / 448
    assert torch.isclose(q.scale_inv[0, 0], blocks)


def test_int32_packing_matches_compressed_tensors_layout():
    # compressed-tensors' documented example: int8 values [1, 2] -> unsigned [129, 130] -> 33409
    assert pack_int32(torch.tensor([[129, 130]]), 8).item() == 33409
    values = torch.randint(0, 16, (24, 40))
    packed = pack_int32(values, 4)
    assert packed.dtype == torch.int32 and packed.shape == (24, 5)
    assert (packed[0, 0].item() & 0xF) == values[0, 0] and ((packed[0, 0].item() >> 4) & 0xF) == values[0, 1]
    assert torch.equal(unpack_int32(packed, 4, 40), values.to(torch.int32))
    along_rows = pack_int32(values, 4, dim=0)
    assert along_rows.shape == (3, 40)
    assert torch.equal(unpack_int32(along_rows, 4, 24, dim=0), values.to(torch.int32))


@pytest.mark.parametrize("shape", [(37, 64), (3, 10, 64)])  # a matrix, stacked experts
def test_quantizing_rows_in_chunks_gives_the_same_values_as_whole(monkeypatch, shape):
    import shoal.quant.formats as formats

    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    whole8, whole4 = Int8ChannelWeight.quantize(w), Int4GroupWeight.quantize(w, 32)
    monkeypatch.setattr(formats, "QUANTIZE_CHUNK", 5 * 64)  # five rows a chunk: uneven last chunk
    assert len(formats._row_chunks(w)) > 1
    chunked8, chunked4 = Int8ChannelWeight.quantize(w), Int4GroupWeight.quantize(w, 32)
    assert torch.equal(chunked8.qweight, whole8.qweight) and torch.equal(chunked8.scales, whole8.scales)
    for field in ("packed", "scales", "zeros"):
        assert torch.equal(getattr(chunked4, field), getattr(whole4, field)), field
