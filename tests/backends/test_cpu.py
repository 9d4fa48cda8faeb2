"""The CPU backend's reported capabilities, memory and device."""

from __future__ import annotations

import os

import torch

from shoal.backends import cpu as cpu_module
from shoal.backends import get_backend


def test_dtypes_include_float32_and_bfloat16():
    cpu = get_backend("cpu")
    supported = cpu.supported_dtypes()
    assert torch.float32 in supported and torch.bfloat16 in supported
    assert torch.float32 in cpu.native_dtypes()
    assert set(cpu.native_dtypes()) <= set(supported)
    assert cpu.default_dtype() == supported[0]
    # bf16 leads (becomes --dtype auto) exactly when the hardware computes in it.
    assert (supported[0] == torch.bfloat16) == (torch.bfloat16 in cpu.native_dtypes())


def test_native_bf16_follows_the_cpu_flags(monkeypatch):
    cpu = get_backend("cpu")
    monkeypatch.setattr(cpu_module, "_cpuinfo", lambda: ("Test CPU", frozenset({"avx2", "fma"})))
    assert cpu.native_dtypes() == [torch.float32]
    assert cpu.supported_dtypes()[0] == torch.float32
    monkeypatch.setattr(cpu_module, "_cpuinfo", lambda: ("Test CPU", frozenset({"avx512f", "avx512_bf16"})))
    assert torch.bfloat16 in cpu.native_dtypes()


def test_memory_info_is_sane():
    memory = get_backend("cpu").memory_info()
    assert 0 < memory.free_bytes <= memory.total_bytes
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 64 << 20 < memory.total_bytes <= physical * 1.01


def test_cgroup_limit_caps_memory(monkeypatch):
    monkeypatch.setattr(cpu_module, "_cgroup_limit", lambda: (1 << 30, 768 << 20))
    memory = cpu_module.system_memory()
    assert memory.total_bytes <= 1 << 30
    assert memory.free_bytes <= 256 << 20


def test_device_and_identity():
    cpu = get_backend("cpu")
    assert cpu.torch_device(0) == torch.device("cpu") == torch.ones(1).device
    assert cpu.dist_backend == "gloo" and cpu.device_count() == 1
    assert cpu.device_name()
    assert cpu.extra_info()["threads"] == str(torch.get_num_threads())
    assert cpu.extra_info()["decode kernels"]  # what decode runs on, for `shoal doctor`
    assert cpu.extra_info()["float32 matmuls"]


def test_reported_quantized_kernels_run():
    kernels = get_backend("cpu").quantized_matmul_kernels()
    assert ("int8pack" in kernels) == hasattr(torch.ops.aten, "_weight_int8pack_mm")
    if "int8pack" in kernels:
        x = torch.randn(2, 32)
        weight = torch.randint(-128, 127, (8, 32), dtype=torch.int8)
        scales = torch.rand(8)
        out = torch.ops.aten._weight_int8pack_mm(x, weight, scales)
        torch.testing.assert_close(out, (x @ weight.float().T) * scales, rtol=1e-4, atol=1e-3)
