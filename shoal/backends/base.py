"""The Backend interface: everything shoal needs to know about a chip, and nothing more.

Model and engine code talk to devices only through a Backend; each device family
(cpu, cuda, npu, xpu, mps, or a third-party plugin) implements one in its own file.
"""

from __future__ import annotations

from typing import Any, TYPE_CHECKING, Callable

import torch

from shoal.backends.profile import MemoryInfo, ThroughputProfile

if TYPE_CHECKING:
    from shoal.backends.ops import Ops


# An attention implementation: (q, k, v, mask, scale) -> output.
# q: [batch, heads, q_len, head_dim]; k, v: [batch, kv_heads, kv_len, head_dim], where kv_heads divides
# heads (grouped-query attention; 1 for MLA's shared latent) and v's last dim may differ from q's;
# mask: bool [batch, 1, q_len, kv_len] (True = attend) or None; returns [batch, heads, q_len, v_dim].
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", float], torch.Tensor]


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """PyTorch's fused scaled-dot-product attention; every backend's default."""
    if k.shape[1] != q.shape[1]:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class Backend:
    """One device family. Subclasses override what differs from these defaults.

    Attributes every backend sets:
      name            registry name ("cpu", "cuda", "npu", ...), what `--device` accepts
      device_type     torch device type string ("cpu", "cuda", "npu", "xpu", "mps")
      dist_backend    torch.distributed backend for collectives ("gloo", "nccl", "hccl", "xccl")
      visible_devices_env  environment variable selecting visible devices, or None
      priority        auto-detection picks the available backend with the highest priority:
                      cpu 10, mps 50, cuda/npu/xpu 100; a plugin left at 0 is chosen only by name
    """

    name: str = "base"
    device_type: str = "cpu"
    dist_backend: str = "gloo"
    visible_devices_env: str | None = None
    priority: int = 0

    # ---- identity and presence -------------------------------------------------
    def is_available(self) -> bool:
        """Whether this device family is present and usable in this process."""
        raise NotImplementedError

    def device_count(self) -> int:
        return 1 if self.is_available() else 0

    def device_name(self, index: int = 0) -> str:
        return self.device_type

    def torch_device(self, index: int = 0) -> torch.device:
        # A CPU tensor's device is plain "cpu"; torch.device("cpu", 0) would compare unequal to it.
        if self.device_type == "cpu":
            return torch.device("cpu")
        return torch.device(self.device_type, index)

    def absence_reason(self) -> str:
        """Why is_available() is False here, phrased as what the user can do about it."""
        return f"no {self.name} device was found"

    def extra_info(self) -> dict[str, str]:
        """Free-form facts for `shoal doctor` (runtime version, CPU features, ...)."""
        return {}

    # ---- device control ----------------------------------------------------------
    def set_device(self, index: int) -> None:
        """Make `index` this process's current device (no-op where devices have no index)."""

    def set_isa_level(self, level: str | None) -> None:
        """Cap the instruction set this backend's own kernels are built for (EngineConfig.cpu_isa; None:
        the backend's default), before the first model is built. A backend without levels ignores it."""

    def synchronize(self) -> None:
        """Wait for all queued work on the current device to finish."""

    def memory_info(self, index: int = 0) -> MemoryInfo:
        raise NotImplementedError

    # ---- capabilities --------------------------------------------------------------
    def supported_dtypes(self) -> list[torch.dtype]:
        """Dtypes this device computes in, best first."""
        return [torch.float32]

    def native_dtypes(self) -> list[torch.dtype]:
        """The subset of supported_dtypes the hardware computes in directly (not emulated)."""
        return self.supported_dtypes()

    def supports_fp8_matmul(self) -> bool:
        return False

    def quantized_matmul_kernels(self) -> list[str]:
        """Names of weight-only quantized matmul kernels this device has.

        Shared vocabulary: "int8pack" (aten._weight_int8pack_mm), "int4pack"
        (aten._weight_int4pack_mm, or its _for_cpu variant on CPU), "npu_wqbmm"
        (torch_npu.npu_weight_quant_batchmatmul, int8 or int4 weights), "cpu-gemv" (shoal's own
        CPU matrix-vector kernels, shoal/backends/cpu/csrc/gemv.c, when a C compiler could build them).
        """
        return []

    def default_dtype(self) -> torch.dtype:
        """What `--dtype auto` becomes on this device."""
        return self.supported_dtypes()[0]

    # ---- choices -------------------------------------------------------------------
    def ops(self, kernels: str = "auto") -> Ops:
        """The operations layers call on this device (shoal/backends/ops.py), bound to a model once when
        it is built: the plain-torch reference here; a backend overrides the ones its chip does faster.
        `kernels` is EngineConfig.cpu_kernels ("auto", "shoal", "torch"), for a backend with a choice."""
        from shoal.backends.ops import Ops

        return Ops()

    def attention_fn(self, *, mla: bool, kv_dtype: torch.dtype) -> AttentionFn:
        """The attention implementation for a layer kind and KV dtype."""
        return sdpa_attention

    def linear_fn(self, weight_format: str, kernels: str = "auto") -> Callable[..., torch.Tensor]:
        """The matmul for a weight format: "dense" is plain F.linear everywhere; "int8", "int4" and "fp8"
        (shoal.quant's formats) get a `QuantizedLinearKernel`, by default the pure-torch one that
        dequantizes on each call. A backend with faster kernels overrides this."""
        if weight_format == "dense":
            return torch.nn.functional.linear
        from shoal.backends.quantized_matmul import FALLBACK_KERNELS

        if weight_format not in FALLBACK_KERNELS:
            raise NotImplementedError(f"backend {self.name!r} has no kernel for weight format {weight_format!r}")
        return FALLBACK_KERNELS[weight_format]

    def graph_wrapper(self) -> Callable | None:
        """Optional wrapper that captures a decode step as a graph (torch.compile, CUDA graphs)."""
        return None

    # ---- measurement -----------------------------------------------------------------
    def measure_throughput(self, index: int = 0, quick: bool = False) -> ThroughputProfile:
        from shoal.backends.measure import measure_device

        return measure_device(self, index=index, quick=quick)

    def kernel_figures(self, quick: bool = False) -> list[dict[str, Any]]:
        """Per decode kernel of the backend's own: the path it runs here and its measured share of the
        memory bandwidth ({"kernel", "path", "weight_bytes", "gbps", "read_gbps", "share"}), for `shoal
        doctor`. None by default: a backend without kernels of its own runs torch's."""
        return []

    def __repr__(self) -> str:
        return f"<Backend {self.name} ({self.device_type}, {self.dist_backend})>"


class AcceleratorBackend(Backend):
    """A device family whose torch module (torch.cuda, torch.npu, torch.xpu) has the usual
    device_count / get_device_name / set_device / synchronize / mem_get_info functions."""

    def _module(self):
        return getattr(torch, self.device_type)

    def device_count(self) -> int:
        return self._module().device_count() if self.is_available() else 0

    def device_name(self, index: int = 0) -> str:
        return self._module().get_device_name(index)

    def set_device(self, index: int) -> None:
        self._module().set_device(index)

    def synchronize(self) -> None:
        self._module().synchronize()

    def memory_info(self, index: int = 0) -> MemoryInfo:
        free, total = self._module().mem_get_info(index)
        return MemoryInfo(free_bytes=free, total_bytes=total)


def packed_matmul_kernels(dispatch_key: str, int4_op: str = "aten::_weight_int4pack_mm") -> list[str]:
    """The "int8pack" / "int4pack" kernels torch implements for `dispatch_key`."""
    kernels = []
    if has_kernel("aten::_weight_int8pack_mm", dispatch_key):
        kernels.append("int8pack")
    if has_kernel(int4_op, dispatch_key):
        kernels.append("int4pack")
    return kernels


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the aten op `op` (e.g. "aten::_weight_int8pack_mm") has a kernel for `dispatch_key`.

    Asking the dispatcher is more honest than hasattr(torch.ops.aten, ...): an op can be
    declared for every device yet only implemented for some.
    """
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key))
    except (RuntimeError, AttributeError):  # unknown op name, or a torch without this private API
        return False
