"""shoal's CPU kernels for batched decode (shoal_matmul_rows_*): bf16 activations of 9 to cpu_gemv.ROWS_MAX
rows against bf16 / int8 / int4 weights, checked against what they replace - F.linear on the weight
dequantized to bf16 - and against the float32 product. int4 weights without AMX multiply int8-quantized
activations (csrc/rows_q8.c): those are checked against the matrix-vector kernel, which quantizes them the
same way, one row at a time."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from shoal.backends.cpu import gemv as cpu_gemv
from shoal.backends.cpu.quantized import int4_cpu, int4_cpu_prepare, int8_cpu, int8_cpu_prepare
from shoal.backends.quantized_matmul import int8_fallback
from shoal.backends.cpu.ops import CpuOps

linear = CpuOps().linear  # the CPU backend's dense linear, as a layer calls it
from shoal.quant.formats import Int4GroupWeight, Int8ChannelWeight

pytestmark = pytest.mark.skipif(not cpu_gemv.available(), reason="the CPU kernels need a C compiler")
needs_rows = pytest.mark.skipif(not cpu_gemv.rows_kernels_available(),
                                reason="the bf16 / int8 batched-decode kernels need AVX512-BF16")
needs_int4_rows = pytest.mark.skipif(not cpu_gemv.rows_int4_available(),
                                     reason="the int4 batched-decode kernels need vectorized lanes or AVX512-BF16")

# AMX tiles where the CPU has them, and the AVX512-BF16 dot products that CPUs without AMX use
PATHS = [pytest.param(True, id="amx"), pytest.param(False, id="avx512bf16")]


def _path(amx: bool) -> bool:
    if amx and not cpu_gemv.rows_use_amx():
        pytest.skip("no AMX on this CPU")
    return amx


def _int4_same_path(x: torch.Tensor, t: dict, group: int, amx: bool) -> torch.Tensor:
    """What the int4 batched kernel should give but for the order of its float32 sums: with AMX the weight
    dequantized to bf16 and F.linear; without it, the matrix-vector kernel one row at a time (the same
    int8 activations)."""
    if amx or not cpu_gemv.quantizes_activations():
        return F.linear(x, cpu_gemv.dequantize_int4(t, group, torch.bfloat16))
    return torch.cat([cpu_gemv.gemv_int4(x[i:i + 1], t, group) for i in range(x.shape[0])])


def _matches(ours: torch.Tensor, same_path: torch.Tensor, exact: torch.Tensor) -> None:
    """`same_path`: F.linear on the bf16 weight, which differs from ours only in the order of the float32
    sums (a bf16 rounding at most); `exact`: the float32 product, within 2%."""
    assert ours.dtype == torch.bfloat16 and ours.shape == same_path.shape
    scale = exact.abs().max().item()
    torch.testing.assert_close(ours.float(), same_path.float(), rtol=2**-7, atol=2**-8 * scale)
    torch.testing.assert_close(ours.float(), exact, rtol=0, atol=0.02 * scale)


@needs_rows
@pytest.mark.parametrize("amx", PATHS)
@pytest.mark.parametrize("rows", [9, 16, 31, 32, 64, 100])
@pytest.mark.parametrize("k", [48, 256, 1040])  # 48 and 1040: not a multiple of the 32-input chunks
def test_bf16_and_int8_weights(amx, rows, k):
    g = torch.Generator().manual_seed(rows * 1000 + k)
    w = torch.randn(67, k, generator=g) * 0.05  # 67: a last tile of weight rows that is not full
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    wb = w.to(torch.bfloat16)
    ours = cpu_gemv.matmul_rows_bf16(x, wb, amx=_path(amx))
    _matches(ours, F.linear(x, wb), x.float() @ wb.float().t())
    for scale_dtype in (torch.bfloat16, torch.float32):
        q = Int8ChannelWeight.quantize(w, scale_dtype)
        q.qweight[0, :4] = -128  # the full int8 range
        q.qweight[1, -3:] = 127
        ours = cpu_gemv.matmul_rows_int8(x, q.qweight, q.scales.float(), amx=amx)
        _matches(ours, int8_fallback(x, {"qweight": q.qweight, "scales": q.scales}), x.float() @ q.dequantize().t())


@needs_int4_rows
@pytest.mark.parametrize("amx", PATHS)
@pytest.mark.parametrize("rows", [9, 16, 31, 32, 64, 100])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_int4_weights(amx, rows, group, scale_dtype):
    g = torch.Generator().manual_seed(rows * 100 + group)
    w = torch.randn(45, 640, generator=g) * 0.05  # 640: more than one 512-input segment of the AMX path
    x = torch.randn(rows, 640, generator=g).to(torch.bfloat16)
    q = Int4GroupWeight.quantize(w, group, scale_dtype)
    t = cpu_gemv.int4_relayout(q.packed, q.scales, q.zeros)
    ours = cpu_gemv.matmul_rows_int4(x, t, group, amx=_path(amx))
    # the weight dequantized to bf16 (as the canonical layout gives it)
    assert torch.equal(cpu_gemv.dequantize_int4(t, group, torch.bfloat16), q.dequantize(torch.bfloat16))
    _matches(ours, _int4_same_path(x, t, group, amx), x.float() @ q.dequantize(torch.bfloat16).float().t())


@needs_int4_rows
@pytest.mark.parametrize("rows", [9, 17, 48, 64])
def test_int4_without_amx_is_the_integer_kernel(rows):
    """Without AMX shoal_matmul_rows_int4 is rows_q8.c's kernel, whose lanes hold 16 activation rows: rows
    past a multiple of 16 are padding, and each real row's output is the matrix-vector kernel's."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(37, 384, generator=g) * 0.05  # 37: a last pass of fewer than 8 weight rows
    x = torch.randn(rows, 384, generator=g).to(torch.bfloat16)
    q = Int4GroupWeight.quantize(w, 128, torch.float32)
    t = cpu_gemv.int4_relayout(q.packed, q.scales, q.zeros)
    ours = cpu_gemv.matmul_rows_q8_int4(x, t, 128)
    assert torch.equal(ours, cpu_gemv.matmul_rows_int4(x, t, 128, amx=False))
    assert torch.equal(ours[:9], cpu_gemv.matmul_rows_q8_int4(x[:9], t, 128))  # other rows change nothing
    _matches(ours, _int4_same_path(x, t, 128, amx=False), x.float() @ q.dequantize().float().t())


@needs_rows
@pytest.mark.parametrize("amx", PATHS)
def test_a_weight_with_a_zero_row_and_strided_activations(amx):
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(5, 64, generator=g) * 0.05).to(torch.bfloat16)  # fewer rows than one tile
    w[2] = 0
    x = torch.randn(12, 128, generator=g).to(torch.bfloat16)[:, ::2]  # not contiguous
    ours = cpu_gemv.matmul_rows_bf16(x, w, amx=_path(amx))
    assert torch.equal(ours[:, 2], torch.zeros(12, dtype=torch.bfloat16))
    _matches(ours, F.linear(x, w), x.float() @ w.float().t())


@needs_rows
def test_rejects_what_it_cannot_take():
    with pytest.raises(ValueError, match="bf16 activations"):
        cpu_gemv.matmul_rows_bf16(torch.zeros(9, 64), torch.zeros(8, 64, dtype=torch.bfloat16))
    x = torch.zeros(12, 64, dtype=torch.bfloat16)
    assert cpu_gemv.rows_kernel_takes(x, 64, "int8")
    assert not cpu_gemv.rows_kernel_takes(x[:8], 64, "int8")  # the matrix-vector kernels' rows
    assert not cpu_gemv.rows_kernel_takes(x.float(), 64, "int8")  # float32 activations keep the matmul
    assert not cpu_gemv.rows_kernel_takes(torch.zeros(cpu_gemv.ROWS_MAX + 1, 128, dtype=torch.bfloat16), 128, "int4")
    assert cpu_gemv.rows_kernel_takes(x, 64, "bf16") == cpu_gemv.rows_use_amx()  # bf16 weights: only with AMX
    assert cpu_gemv.rows_kernel_takes(torch.zeros(cpu_gemv.ROWS_MAX_WITHOUT_AMX + 1, 64, dtype=torch.bfloat16), 64,
                                      "int8") == cpu_gemv.rows_use_amx()


def test_switched_off_by_the_environment(monkeypatch):
    x = torch.zeros(12, 64, dtype=torch.bfloat16)
    monkeypatch.setenv(cpu_gemv.ROWS_ENV_SWITCH, "0")
    assert not cpu_gemv.rows_kernels_available() and not cpu_gemv.rows_kernel_takes(x, 64, "int4")
    assert cpu_gemv.available()  # the matrix-vector kernels stay


@needs_rows
@pytest.mark.parametrize("rows", [12, 32])
def test_the_cpu_kernels_send_batched_decode_rows_here(monkeypatch, rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(40, 256, generator=g) * 0.05
    x = torch.randn(rows, 256, generator=g).to(torch.bfloat16)
    calls = []
    for name in ("matmul_rows_bf16", "matmul_rows_int8", "matmul_rows_int4"):
        kernel = getattr(cpu_gemv, name)
        monkeypatch.setattr(cpu_gemv, name, lambda *a, kernel=kernel, name=name, **kw: calls.append(name) or kernel(*a, **kw))

    q8 = Int8ChannelWeight.quantize(w, torch.bfloat16)
    t8 = int8_cpu_prepare({"qweight": q8.qweight, "scales": q8.scales}, 0)
    _matches(int8_cpu(x, t8), int8_fallback(x, t8), x.float() @ q8.dequantize().t())
    q4 = Int4GroupWeight.quantize(w, 64, torch.bfloat16)
    t4 = int4_cpu_prepare({"qweight": q4.packed, "scales": q4.scales, "zeros": q4.zeros}, 64)
    _matches(int4_cpu(x, t4, 64), _int4_same_path(x, t4, 64, cpu_gemv.rows_use_amx()), x.float() @ q4.dequantize().t())
    wb, b = w.to(torch.bfloat16), torch.randn(40, generator=g).to(torch.bfloat16)
    ours = linear(x.view(1, rows, 256), wb, b)
    assert ours.shape == (1, rows, 40)
    _matches(ours[0], F.linear(x, wb, b), x.float() @ wb.float().t() + b.float())
    assert calls == ["matmul_rows_int8", "matmul_rows_int4"] + (["matmul_rows_bf16"] if cpu_gemv.rows_use_amx() else [])

    # a prefill chunk and float32 activations keep the matmul
    calls.clear()
    big = torch.randn(cpu_gemv.ROWS_MAX + 1, 256, generator=g).to(torch.bfloat16)
    int8_cpu(big, t8), int4_cpu(big, t4, 64), linear(big, wb), int4_cpu(x.float(), t4, 64)
    assert calls == []


@needs_rows
def test_without_amx_bf16_weights_keep_f_linear_and_quantized_ones_stop_earlier(monkeypatch):
    monkeypatch.setattr(cpu_gemv, "rows_use_amx", lambda: False)
    rows = cpu_gemv.ROWS_MAX_WITHOUT_AMX
    assert not cpu_gemv.rows_kernel_takes(torch.zeros(12, 64, dtype=torch.bfloat16), 64, "bf16")
    assert cpu_gemv.rows_kernel_takes(torch.zeros(rows, 64, dtype=torch.bfloat16), 64, "int4")
    assert not cpu_gemv.rows_kernel_takes(torch.zeros(rows + 1, 64, dtype=torch.bfloat16), 64, "int4")
    # and int4_cpu then multiplies with the integer kernel
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 256, generator=g) * 0.05
    x = torch.randn(20, 256, generator=g).to(torch.bfloat16)
    q4 = Int4GroupWeight.quantize(w, 32, torch.bfloat16)
    t4 = int4_cpu_prepare({"qweight": q4.packed, "scales": q4.scales, "zeros": q4.zeros}, 32)
    _matches(int4_cpu(x, t4, 32), _int4_same_path(x, t4, 32, amx=False), x.float() @ q4.dequantize().t())


@pytest.mark.parametrize("rows", [129, 131, 160, 200])
def test_a_prefill_chunk_runs_in_row_buckets_with_the_same_rows(monkeypatch, rows):
    """Above the batched kernels, bf16 rows go to F.linear padded to a multiple of ROW_BUCKET (so that
    oneDNN builds a kernel per bucket, not per token count): each real row's output is unchanged."""
    x = torch.randn(rows, 96).bfloat16()
    w = torch.randn(40, 96).bfloat16()
    b = torch.randn(40).bfloat16()
    calls = []
    real = F.linear
    monkeypatch.setattr(F, "linear", lambda a, *rest: (calls.append(a.numel() // a.shape[-1]), real(a, *rest))[1])
    y = linear(x[None], w, b)
    assert calls == [-(-rows // cpu_gemv.ROW_BUCKET) * cpu_gemv.ROW_BUCKET]
    assert y.shape == (1, rows, 40)
    torch.testing.assert_close(y[0], real(x, w, b), rtol=0.02, atol=0.02)
    assert torch.equal(cpu_gemv.linear_in_buckets(x.float(), w.float()), real(x.float(), w.float()))  # float32: as is
