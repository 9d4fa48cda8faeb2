"""The MPS backend: Apple-silicon GPUs through Metal, sharing the Mac's unified memory with the CPU."""

from __future__ import annotations

import platform

import torch

from shoal.backends.base import Backend, MemoryInfo, packed_matmul_kernels


def _macos_version() -> tuple[int, ...]:
    release = platform.mac_ver()[0]
    return tuple(int(part) for part in release.split(".") if part.isdigit()) if release else ()


class MpsBackend(Backend):
    name = "mps"
    device_type = "mps"
    dist_backend = "gloo"  # Metal has no collectives library; multi-process runs go through the CPU
    visible_devices_env = None  # a Mac has one GPU
    priority = 50

    def is_available(self) -> bool:
        return torch.backends.mps.is_available()

    def absence_reason(self) -> str:
        if not torch.backends.mps.is_built():
            return "this torch was built without MPS; MPS exists only on Apple-silicon Macs"
        return "MPS is built into this torch but unavailable; it needs macOS 12.3 or later on Apple silicon"

    def device_count(self) -> int:
        return 1 if self.is_available() else 0

    def device_name(self, index: int = 0) -> str:
        return f"Apple GPU ({platform.machine()}, macOS {platform.mac_ver()[0] or 'unknown'})"

    def torch_device(self, index: int = 0) -> torch.device:
        return torch.device("mps")

    def synchronize(self) -> None:
        torch.mps.synchronize()

    def memory_info(self, index: int = 0) -> MemoryInfo:
        # Unified memory: Metal's recommended working-set size is the real ceiling for the GPU,
        # not the Mac's RAM; what Metal has already handed out is no longer free.
        if hasattr(torch.mps, "recommended_max_memory"):
            total = torch.mps.recommended_max_memory()
        else:
            from shoal.backends.cpu import system_memory

            total = system_memory().total_bytes
        used = torch.mps.driver_allocated_memory() if hasattr(torch.mps, "driver_allocated_memory") else 0
        return MemoryInfo(free_bytes=max(total - used, 0), total_bytes=total)

    def native_dtypes(self) -> list[torch.dtype]:
        # Metal computes bf16 only from macOS 14 (Sonoma) on; where it can, bf16 leads because
        # most checkpoints are trained in it and overflow less there than in fp16.
        if _macos_version() >= (14,):
            return [torch.bfloat16, torch.float16, torch.float32]
        return [torch.float16, torch.float32]

    def supported_dtypes(self) -> list[torch.dtype]:
        return self.native_dtypes()

    def quantized_matmul_kernels(self) -> list[str]:
        return packed_matmul_kernels("MPS")
