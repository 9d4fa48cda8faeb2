"""float32 weights packed once, at load time, for MKL's sgemm on the CPU.

`F.linear` on a float32 weight hands MKL the plain [out, in] matrix, and MKL re-lays the weight into
its own blocked format inside every call. For a prefill chunk of thousands of rows that copy is lost in
the multiplies; for a batched decode step (a few to a few hundred rows) it is a large part of the call.
Packing each weight once (`cblas_sgemm_pack`, as torch.compile's CPU freezing does through
`mkl::_mkl_reorder_linear_weight`) and multiplying with `cblas_sgemm_compute` leaves only the
multiplies. Measured ad hoc, [32, 512] rows against llama-34m's weights: 1.4-1.5x F.linear's rate for
the layer weights at one thread, about 2x at two; within noise at one row and at 2048.

The CBLAS functions are the ones torch's own library exports (torch built with MKL, as the x86 wheels
are); they are called through ctypes, so that a recorded decode step (capture.py) and a lone token's
experts (csrc/experts.c, WEIGHT_F32_PACKED) multiply with the same packed buffers and get the same
bits. MKL takes its thread count from torch.set_num_threads.

A packed copy costs about as much memory as the weight (measured ad hoc: +135 MiB resident for
llama-34m's 136 MiB), so `pack_model` packs only while the copies fit in half of the free memory (see
MEMORY_SHARE); SHOAL_CPU_PACKED_F32=0 switches packing off. A weight is packed once for PACK_ROWS rows
and then multiplied with any row count, which relies on MKL's packed layout of B not depending on the
row count; `pack` checks that on each weight (a few rows against F.linear) and keeps a weight unpacked
where it fails.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path

import torch
from torch import nn

from shoal.backends.cpu.capture import call

ENV_SWITCH = "SHOAL_CPU_PACKED_F32"
PACK_ROWS = 32  # the row count given to the packing call: a batched decode step's typical size
MEMORY_SHARE = 0.5  # pack only while the packed copies fit in this share of free memory
# CBLAS enum values (mkl_cblas.h)
_ROW_MAJOR, _NO_TRANS, _TRANS, _PACKED, _B_MATRIX = 101, 111, 112, 151, 162

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _cblas() -> ctypes.CDLL | None:
    """torch's CPU library with MKL's packed sgemm functions typed, or None where it has none."""
    if not torch.backends.mkl.is_available():
        return None
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        get_size, pack_fn, compute = lib.cblas_sgemm_pack_get_size, lib.cblas_sgemm_pack, lib.cblas_sgemm_compute
    except (OSError, AttributeError):
        return None
    i32, p = ctypes.c_int, ctypes.c_void_p  # MKL_INT is 32-bit in the LP64 interface these names are
    get_size.argtypes, get_size.restype = [i32, i32, i32, i32], ctypes.c_size_t
    pack_fn.argtypes = [i32, i32, i32, i32, i32, i32, ctypes.c_float, p, i32, p]
    pack_fn.restype = None
    compute.argtypes = [i32, i32, i32, i32, i32, i32, p, i32, p, i32, ctypes.c_float, p, i32]
    compute.restype = None
    return lib


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether torch's library has MKL's packed sgemm and packing is not switched off."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return _cblas() is not None


def compute_address() -> int | None:
    """The address of cblas_sgemm_compute, for the C decode step, or None where packing is unavailable."""
    lib = _cblas() if available() else None
    return None if lib is None else ctypes.cast(lib.cblas_sgemm_compute, ctypes.c_void_p).value


class PackedF32:
    """One float32 weight [n, k] in MKL's packed layout (`buffer`), tied to the version of the weight it
    was packed from: a weight changed in place afterwards makes `is_current` False and `takes` refuse."""

    def __init__(self, weight: torch.Tensor, buffer: torch.Tensor) -> None:
        self.source, self.source_version = weight, weight._version
        self.buffer = buffer
        self.n, self.k = weight.shape
        self._compute = compute_address()  # named in a recorded step (capture.py)

    def is_current(self) -> bool:
        return self.source._version == self.source_version

    def packs(self, weight: torch.Tensor) -> bool:
        """Whether this is `weight`'s packed copy, and up to date."""
        return weight.data_ptr() == self.source.data_ptr() and self.is_current()

    def takes(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        return (x.dtype == torch.float32 and x.device.type == "cpu" and x.numel() > 0 and x.shape[-1] == self.k
                and self.packs(weight))

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., k] float32 -> x W^T (+ bias, added afterwards as torch adds it)."""
        flat = x.reshape(-1, self.k).contiguous()
        y = torch.empty(flat.shape[0], self.n, dtype=torch.float32)
        call(_compute_at, "cblas_sgemm_compute", self._compute, _ROW_MAJOR, _NO_TRANS, _PACKED, flat.shape[0],
             self.n, self.k, flat.data_ptr(), self.k, self.buffer.data_ptr(), self.k, 0.0, y.data_ptr(), self.n,
             keep=(flat, self.buffer, y))
        y = y.view(*x.shape[:-1], self.n)
        return y if bias is None else y + bias  # (CpuOps.linear adds a layer's bias with its own add op)


def _compute_at(address: int, *args) -> int:
    """cblas_sgemm_compute(*args), named by its address as a recorded step names it (capture.py)."""
    _cblas().cblas_sgemm_compute(*args)
    return 0


def pack(weight: torch.Tensor) -> PackedF32 | None:
    """`weight` [n, k] packed for MKL, or None where it cannot be (not a contiguous float32 CPU weight,
    packing unavailable) or where the packed layout fails the row-count check."""
    if not available() or weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2:
        return None
    if not weight.is_contiguous() or weight.numel() == 0 or max(weight.shape) >= 2**31:
        return None
    lib = _cblas()
    n, k = weight.shape
    buffer = torch.empty(lib.cblas_sgemm_pack_get_size(_B_MATRIX, PACK_ROWS, n, k), dtype=torch.uint8)
    lib.cblas_sgemm_pack(_ROW_MAJOR, _B_MATRIX, _TRANS, PACK_ROWS, n, k, 1.0, weight.data_ptr(), k, buffer.data_ptr())
    packed = PackedF32(weight, buffer)
    with torch.inference_mode():
        probe = torch.randn(3, k, generator=torch.Generator().manual_seed(0))
        expected = nn.functional.linear(probe, weight)
        finite = expected.isfinite()  # outputs an inf / NaN weight spoils are not compared
        scale = float(expected[finite].abs().max()) if finite.any() else 0.0
        if bool((((packed(probe) - expected).abs() > 1e-4 * scale) & finite).any()):
            log.info("MKL's packed sgemm disagreed with F.linear on a [%d, %d] weight; it stays unpacked", n, k)
            return None
    return packed


def pack_model(model: nn.Module, free_bytes: int) -> int:
    """Pack the float32 weights of `model`'s Linear and LMHead modules (their `prepared`) and of its MoE
    layers' routed experts (StackedExperts.prepared: a (gate_up, down) pair per expert) while the copies
    fit in MEMORY_SHARE of `free_bytes`; returns the bytes packed."""
    from shoal.layers.embedding import LMHead
    from shoal.layers.linear import Linear
    from shoal.layers.moe import StackedExperts

    if not available():
        return 0
    budget = int(MEMORY_SHARE * free_bytes)
    used = 0
    for module in model.modules():
        if type(module) is StackedExperts:
            size = (module.gate_up.numel() + module.down.numel()) * module.gate_up.element_size()
            if module.gate_up.dtype != torch.float32 or not module.gate_up.is_cpu or used + size > budget:
                continue
            pairs = [(pack(module.gate_up.detach()[e]), pack(module.down.detach()[e])) for e in range(module.num_experts)]
            if all(g is not None and d is not None for g, d in pairs):
                module.prepared = pairs
                used += size
            continue
        if not isinstance(module, (Linear, LMHead)):
            continue
        weight = module.tied_to.weight if isinstance(module, LMHead) and module.tied_to is not None else module.weight
        size = weight.numel() * weight.element_size()
        if weight.dtype != torch.float32 or weight.device.type != "cpu" or used + size > budget:
            continue
        module.prepared = pack(weight.detach())
        used += size if module.prepared is not None else 0
    return used
