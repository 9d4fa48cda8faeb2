"""The NPU backend: Huawei Ascend chips through torch_npu (which adds torch.npu and the "npu" device).

torch_npu is imported only when availability is first asked, never at module top, so shoal
imports on machines without CANN; every other method runs only after is_available() said yes.
"""

from __future__ import annotations

import types

import torch

from shoal.backends.base import AcceleratorBackend

_torch_npu: types.ModuleType | None = None
_import_error: str | None = None


def _load_torch_npu() -> types.ModuleType | None:
    """Import torch_npu once; remember why it failed so absence_reason can say."""
    global _torch_npu, _import_error
    if _torch_npu is None and _import_error is None:
        try:
            import torch_npu  # noqa: PLC0415 — deliberately lazy, see module docstring

            _torch_npu = torch_npu
        except ModuleNotFoundError as exc:
            if exc.name != "torch_npu":  # installed, but something it needs is not
                _import_error = _cann_missing(exc)
            else:
                _import_error = (f"torch_npu is not installed; pip install the torch-npu release that matches "
                                 f"torch {torch.__version__}")
        except Exception as exc:  # a half-installed CANN toolkit: ImportError (libhccl.so), OSError, RuntimeError
            _import_error = _cann_missing(exc)
    return _torch_npu


def _cann_missing(exc: BaseException) -> str:
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return (f"torch_npu is installed but fails to load ({message}): the Ascend CANN toolkit is missing or not on "
            "the library path; install CANN and run `source /usr/local/Ascend/ascend-toolkit/set_env.sh` (or "
            "your install's set_env.sh) before starting shoal")


class NpuBackend(AcceleratorBackend):
    name = "npu"
    device_type = "npu"
    dist_backend = "hccl"
    visible_devices_env = "ASCEND_RT_VISIBLE_DEVICES"
    priority = 100

    def is_available(self) -> bool:
        if _load_torch_npu() is None:
            return False
        try:
            return bool(torch.npu.is_available())
        except Exception:  # driver present but unusable; absence_reason reports it
            return False

    def absence_reason(self) -> str:
        if _load_torch_npu() is None:
            return _import_error or "torch_npu could not be imported"
        return "torch_npu found no Ascend device; check that npu-smi info lists one and ASCEND_RT_VISIBLE_DEVICES"

    def supported_dtypes(self) -> list[torch.dtype]:
        # 910B and later compute in bf16; 910A and the 310 series only in fp16.
        is_bf16 = getattr(torch.npu, "is_bf16_supported", None)
        if is_bf16 is not None and is_bf16():
            return [torch.bfloat16, torch.float16, torch.float32]
        return [torch.float16, torch.float32]

    def supports_fp8_matmul(self) -> bool:
        return False  # 910B has no fp8 units; revisit for the 950 series once torch_npu exposes them

    def quantized_matmul_kernels(self) -> list[str]:
        if _torch_npu is not None and hasattr(_torch_npu, "npu_weight_quant_batchmatmul"):
            return ["npu_wqbmm"]
        return []

    def extra_info(self) -> dict[str, str]:
        version = getattr(_torch_npu, "__version__", "unknown") if _torch_npu is not None else "not installed"
        return {"runtime": f"torch_npu {version}"}
