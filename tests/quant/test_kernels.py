"""The CPU's int8 / int4 kernels (shoal's own and aten's packed ones) against the pure-torch fallback, and which one a backend hands out."""

from __future__ import annotations

import pytest
import torch

from shoal.backends import get_backend
from shoal.backends.cpu import gemv as cpu_gemv
from shoal.backends.base import Backend
from shoal.backends.cpu.quantized import int4_cpu_prepare
from shoal.backends.quantized_matmul import FALLBACK_KERNELS
from shoal.quant.formats import Fp8BlockWeight, Int4GroupWeight, Int8ChannelWeight

CPU = get_backend("cpu")


def _tensors(fmt, w, group=64):
    if fmt == "int8":
        q = Int8ChannelWeight.quantize(w, torch.bfloat16)
        return q, {"qweight": q.qweight, "scales": q.scales}
    q = Int4GroupWeight.quantize(w, group, torch.bfloat16)
    return q, {"qweight": q.packed, "scales": q.scales, "zeros": q.zeros}


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("tokens", [1, 5, 33])
@pytest.mark.parametrize("kernels", ["cpu-gemv", "aten"])
def test_cpu_kernel_agrees_with_fallback_and_dequantized_weight(fmt, tokens, kernels, monkeypatch):
    # Each path this host can run, forced: shoal's kernels (vectorized or, without AVX-512, the portable
    # loops the backend would not choose here) and aten's packed ones.
    if kernels == "aten":
        monkeypatch.setattr(cpu_gemv, "vectorized", lambda: False)
        if ("int8pack" if fmt == "int8" else "int4pack") not in CPU.quantized_matmul_kernels():
            pytest.skip("this torch build has no packed CPU kernel")
    elif not cpu_gemv.available():
        pytest.skip("no C compiler here: shoal's CPU kernels are not built")
    else:
        monkeypatch.setattr(cpu_gemv, "vectorized", lambda: True)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=g) * 0.05
    x = torch.randn(tokens, 256, generator=g).to(torch.bfloat16)
    q, tensors = _tensors(fmt, w)
    kernel = CPU.linear_fn(fmt)
    assert kernel.name == f"{fmt}-gemv"
    tensors_k = kernel.prepare(tensors, 64)
    if fmt == "int4":
        assert ("qweight_gemv" if kernels == "cpu-gemv" else "qweight_cpu") in tensors_k
    ours = kernel(x, tensors_k, 64).float()
    fallback = FALLBACK_KERNELS[fmt](x, tensors, 64).float()
    reference = x.float() @ q.dequantize().t()
    scale = reference.abs().max()
    assert (ours - reference).abs().max() < 0.02 * scale
    assert (ours - fallback).abs().max() < 0.02 * scale


def test_int4_kernel_keeps_canonical_layout_when_the_shape_does_not_fit(monkeypatch):
    monkeypatch.setattr(cpu_gemv, "vectorized", lambda: False)
    w = torch.randn(24, 64)  # 24 outputs: aten's CPU int4 kernel needs a multiple of 16
    _, tensors = _tensors("int4", w, 32)
    assert int4_cpu_prepare(tensors, 32) is tensors
    x = torch.randn(2, 64).to(torch.bfloat16)
    assert CPU.linear_fn("int4")(x, tensors, 32).shape == (2, 24)


def test_a_backend_without_kernels_gets_the_fallback_and_fp8_dequantizes():
    assert Backend().linear_fn("int8") is FALLBACK_KERNELS["int8"]
    assert Backend().supports_fp8_matmul() is False
    w = torch.randn(130, 260)
    q = Fp8BlockWeight.quantize(w)
    tensors = {"qweight": q.weight, "scales": q.scale_inv.repeat_interleave(128, 0)[:130]}
    x = torch.randn(3, 260)
    y = Backend().linear_fn("fp8")(x, tensors)
    assert torch.allclose(y, x @ q.dequantize().t(), atol=1e-4)
    with pytest.raises(NotImplementedError):
        Backend().linear_fn("int3")
