"""shoal's CPU matrix-vector kernels (shoal/backends/cpu/csrc/gemv.c) against float32 references."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from shoal.backends.cpu import gemv as cpu_gemv
from shoal.backends.cpu.ops import CpuOps

linear = CpuOps().linear
from shoal.quant.formats import Int4GroupWeight, Int8ChannelWeight

pytestmark = pytest.mark.skipif(not cpu_gemv.available(), reason="no C compiler here: the kernels are not built")


def _close(ours: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype, tol: float = 1e-5) -> None:
    # float32 activations: only the summation order differs; bf16: the output is rounded to bf16.
    tol = max(tol, 0 if dtype == torch.float32 else 8e-3)
    scale = reference.abs().max().item()
    assert ours.dtype == dtype
    assert (ours.float() - reference).abs().max().item() <= tol * scale


def _as_the_kernel_sees(x: torch.Tensor, k: int) -> torch.Tensor:
    """x as the int8 / int4 kernels multiply it: quantized to int8 per block of 32 where they do that."""
    if x.dtype != torch.bfloat16 or not cpu_gemv.quantizes_activations() or k % 64:
        return x.float()
    x = x.float()
    blocks = x.view(x.shape[0], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.round(blocks / torch.where(d > 0, d, 1)).clamp(-127, 127)
    return (q * d).view_as(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("k", [48, 256, 1040])  # 48 and 1040: not a multiple of the unrolled loops
def test_bf16_and_int8_weights(dtype, rows, k):
    g = torch.Generator().manual_seed(rows * 1000 + k)
    w = torch.randn(70, k, generator=g) * 0.05
    x = torch.randn(rows, k, generator=g).to(dtype)
    wb = w.to(torch.bfloat16)
    _close(cpu_gemv.gemv_bf16(x, wb), x.float() @ wb.float().t(), dtype)
    q = Int8ChannelWeight.quantize(w, torch.float32)
    q.qweight[0, :4] = -128  # the full int8 range, which the VNNI path must not overflow on
    _close(cpu_gemv.gemv_int8(x, q.qweight, q.scales), _as_the_kernel_sees(x, k) @ q.dequantize().t(), dtype)
    # and against the activations as given: the quantization of the activations costs little
    _close(cpu_gemv.gemv_int8(x, q.qweight, q.scales), x.float() @ q.dequantize().t(), dtype, tol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 4, 7])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_int4_weights_in_the_kernel_layout(dtype, rows, group, scale_dtype):
    g = torch.Generator().manual_seed(rows * 100 + group)
    w = torch.randn(45, 384, generator=g) * 0.05
    x = torch.randn(rows, 384, generator=g).to(dtype)
    q = Int4GroupWeight.quantize(w, group, scale_dtype)
    t = cpu_gemv.int4_relayout(q.packed, q.scales, q.zeros)
    assert t["scales"].dtype == scale_dtype
    ours = cpu_gemv.gemv_int4(x, t, group)
    _close(ours, _as_the_kernel_sees(x, 384) @ q.dequantize().t(), dtype, tol=2e-5)
    _close(ours, x.float() @ q.dequantize().t(), dtype, tol=2e-2)
    # Prefill's path: the whole weight back as bf16, exactly what the canonical layout dequantizes to.
    assert torch.equal(cpu_gemv.dequantize_int4(t, group, torch.bfloat16), q.dequantize(torch.bfloat16))
    assert torch.equal(cpu_gemv.dequantize_int4(t, group, torch.float32), q.dequantize(torch.float32))


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_one_int4_row_takes_four_weight_rows_at_once_with_the_same_bits(group, scale_dtype):
    """One bf16 activation row goes through four weight rows per pass (dot_int4_x4); each output must have
    the bits a pass over that weight row alone gives (two activation rows: one row at a time), so a
    token's result does not depend on how many others share its step. 45 rows: a tail of one."""
    g = torch.Generator().manual_seed(group)
    w = torch.randn(45, 384, generator=g) * 0.05
    x = torch.randn(1, 384, generator=g).bfloat16()
    q = Int4GroupWeight.quantize(w, group, scale_dtype)
    t = cpu_gemv.int4_relayout(q.packed, q.scales, q.zeros)
    alone = cpu_gemv.gemv_int4(x, t, group)
    assert torch.equal(alone[0], cpu_gemv.gemv_int4(torch.cat([x, -x]), t, group)[0])


def test_only_a_few_rows_of_a_supported_dtype_are_accepted():
    assert cpu_gemv.accepts(torch.zeros(8, 64), 64)
    assert not cpu_gemv.accepts(torch.zeros(9, 64), 64)  # a prefill chunk: a matmul instead
    assert not cpu_gemv.accepts(torch.zeros(2, 40), 40)  # in_features must be a multiple of 16
    assert not cpu_gemv.accepts(torch.zeros(2, 64, dtype=torch.float16), 64)
    assert cpu_gemv.int4_layout_fits(256, 64) and not cpu_gemv.int4_layout_fits(192, 64)


@pytest.mark.parametrize("rows", [1, 6, 12])
def test_dense_linear_uses_the_kernel_for_decode_and_agrees_with_f_linear(rows):
    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(96, 128, generator=g) * 0.05).to(torch.bfloat16)
    b = torch.randn(96, generator=g).to(torch.bfloat16)
    x = torch.randn(1, rows, 128, generator=g).to(torch.bfloat16)
    ours, reference = linear(x, w, b), F.linear(x.float(), w.float(), b.float())
    assert ours.shape == (1, rows, 96)
    _close(ours, reference, torch.bfloat16)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(cpu_gemv.ENV_SWITCH, "0")
    cpu_gemv.library.cache_clear()
    try:
        assert cpu_gemv.library() is None and not cpu_gemv.available()
    finally:
        monkeypatch.delenv(cpu_gemv.ENV_SWITCH)
        cpu_gemv.library.cache_clear()
    assert cpu_gemv.available()


def test_linear_takes_no_rows():

    w = torch.randn(24, 32).to(torch.bfloat16)
    assert linear(torch.empty(0, 32, dtype=torch.bfloat16), w).shape == (0, 24)
