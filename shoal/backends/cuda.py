"""The CUDA backend: NVIDIA GPUs, and AMD GPUs through ROCm builds of torch (which reuse torch.cuda).

A ROCm build keeps the name "cuda" (that is what torch calls the device) but says "ROCm" in
extra_info, and its collectives come from RCCL, which registers as "nccl".
"""

from __future__ import annotations

import os

import torch

from shoal.backends.base import AcceleratorBackend, has_kernel


def _is_rocm() -> bool:
    return getattr(torch.version, "hip", None) is not None


def _capability() -> tuple[int, int]:
    """Compute capability of the current device (set_device picks it)."""
    return _capability()


def _rocm_arch() -> str:
    """The AMD GPU's architecture name, e.g. "gfx942:sramecc+:xnack-" for MI300."""
    return _rocm_arch()


class CudaBackend(AcceleratorBackend):
    name = "cuda"
    device_type = "cuda"
    dist_backend = "nccl"
    priority = 100

    @property
    def visible_devices_env(self) -> str:  # type: ignore[override]
        # ROCm honours HIP_VISIBLE_DEVICES first; report the one the user most likely set.
        if _is_rocm() and "CUDA_VISIBLE_DEVICES" not in os.environ:
            return "HIP_VISIBLE_DEVICES"
        return "CUDA_VISIBLE_DEVICES"

    def is_available(self) -> bool:
        return torch.cuda.is_available()

    def absence_reason(self) -> str:
        if torch.version.cuda is None and not _is_rocm():
            return (
                f"this torch ({torch.__version__}) was built without CUDA or ROCm; "
                "install a CUDA or ROCm build of torch from https://pytorch.org"
            )
        env = self.visible_devices_env
        if os.environ.get(env, None) == "":
            return f"{env} is set to an empty string, which hides every GPU; unset it or list device ids"
        return "torch found no GPU; check that the driver is installed (nvidia-smi or rocm-smi lists the device)"

    def native_dtypes(self) -> list[torch.dtype]:
        try:
            native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch before 2.3 has no including_emulation and never emulates
            native_bf16 = torch.cuda.is_bf16_supported()
        return [torch.bfloat16, torch.float16, torch.float32] if native_bf16 else [torch.float16, torch.float32]

    def supported_dtypes(self) -> list[torch.dtype]:
        # Pre-Ampere NVIDIA GPUs emulate bf16: it runs, slowly, so it stays listed but not first.
        native = self.native_dtypes()
        if torch.bfloat16 not in native and torch.cuda.is_bf16_supported():
            return native + [torch.bfloat16]
        return native

    def supports_fp8_matmul(self) -> bool:
        if not has_kernel("aten::_scaled_mm", "CUDA"):
            return False
        if _is_rocm():
            # MI300 (gfx942) and later have fp8 units; their "capability" numbers do not say so.
            return _rocm_arch().startswith(("gfx94", "gfx95", "gfx12"))
        return _capability() >= (8, 9)  # Ada and Hopper onwards

    def quantized_matmul_kernels(self) -> list[str]:
        kernels = []
        if has_kernel("aten::_weight_int8pack_mm", "CUDA"):
            kernels.append("int8pack")
        # On NVIDIA, tinygemm's int4 kernel is compiled in but fails before Ampere (sm_80).
        if has_kernel("aten::_weight_int4pack_mm", "CUDA") and (_is_rocm() or _capability() >= (8, 0)):
            kernels.append("int4pack")
        return kernels

    def extra_info(self) -> dict[str, str]:
        if _is_rocm():
            info = {"runtime": f"ROCm {torch.version.hip}"}
            if self.is_available():
                info["arch"] = _rocm_arch()
            return info
        info = {"runtime": f"CUDA {torch.version.cuda}"}
        if self.is_available():
            major, minor = _capability()
            info["compute_capability"] = f"{major}.{minor}"
        return info
