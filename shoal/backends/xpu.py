"""The XPU backend: Intel GPUs (Arc, Data Center GPU Max) through torch.xpu, built into torch since 2.4."""

from __future__ import annotations

import torch

from shoal.backends.base import AcceleratorBackend, MemoryInfo, has_kernel, packed_matmul_kernels


def _xpu_module():
    """torch.xpu, or None in a torch too old to have it."""
    return getattr(torch, "xpu", None)


class XpuBackend(AcceleratorBackend):
    name = "xpu"
    device_type = "xpu"
    dist_backend = "xccl"
    visible_devices_env = "ZE_AFFINITY_MASK"
    priority = 100

    def is_available(self) -> bool:
        xpu = _xpu_module()
        return xpu is not None and xpu.is_available()

    def absence_reason(self) -> str:
        xpu = _xpu_module()
        if xpu is None or not getattr(xpu, "_is_compiled", lambda: True)():
            return (
                f"this torch ({torch.__version__}) was built without XPU; "
                "install an XPU build from https://pytorch.org"
            )
        return (
            "torch.xpu found no Intel GPU; install an XPU build of torch (https://pytorch.org) "
            "and the Intel GPU driver, and check ZE_AFFINITY_MASK"
        )

    def memory_info(self, index: int = 0) -> MemoryInfo:
        if hasattr(torch.xpu, "mem_get_info"):  # torch >= 2.6
            free, total = torch.xpu.mem_get_info(index)
            return MemoryInfo(free_bytes=free, total_bytes=total)
        # Older torch knows only the total and what its own allocator holds.
        total = torch.xpu.get_device_properties(index).total_memory
        return MemoryInfo(free_bytes=total - torch.xpu.memory_reserved(index), total_bytes=total)

    def supported_dtypes(self) -> list[torch.dtype]:
        if torch.xpu.is_bf16_supported():
            return [torch.bfloat16, torch.float16, torch.float32]
        return [torch.float16, torch.float32]

    def supports_fp8_matmul(self) -> bool:
        return has_kernel("aten::_scaled_mm", "XPU")

    def quantized_matmul_kernels(self) -> list[str]:
        return packed_matmul_kernels("XPU")
