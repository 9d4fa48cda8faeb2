"""float32 weights packed once, at load time, for MKL's sgemm on the CPU.

`F.linear` on a float32 weight hands MKL the plain [out, in] matrix, and MKL re-lays the weight into
its own blocked format inside every call. For a prefill chunk of thousands of rows that copy is lost in
the multiplies; for a batched decode step (2 to a few hundred rows) it is a large part of the call.
Packing each weight once (`cblas_sgemm_pack`, reached through torch's `mkl::_mkl_reorder_linear_weight`,
the op torch.compile's CPU freezing uses) and multiplying with `cblas_sgemm_compute`
(`mkl::_mkl_linear`) leaves only the multiplies. Measured ad hoc, one thread, [32, 512] rows against
llama-34m's weights: 1.4-1.5x F.linear's rate for the layer weights, 1.25x for the [32000, 512] output
head; within noise at one row and at 2048.

A packed copy costs as much memory as the weight, so `pack_model` packs only while the copies fit in
half of the free memory (see MEMORY_SHARE); SHOAL_CPU_PACKED_F32=0 switches packing off. torch's op
multiplies with the packed weight only when the row count equals the one given at packing, and falls
back to F.linear otherwise; shoal passes every call's own count, which relies on the packed layout of B
not depending on the row count. `pack` checks that on each weight (a few rows against F.linear) and
keeps a weight unpacked where it fails.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
from torch import nn

ENV_SWITCH = "SHOAL_CPU_PACKED_F32"
PACK_ROWS = 32  # the row count given to the packing call: a batched decode step's typical size
MIN_ROWS = 2  # below this F.linear keeps the call: one row measured no faster packed
MEMORY_SHARE = 0.5  # pack only while the packed copies fit in this share of free memory

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether torch was built with MKL's packed sgemm ops and packing is not switched off."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear") and hasattr(
            torch.ops.mkl, "_mkl_reorder_linear_weight"
        )
    except (AttributeError, RuntimeError):
        return False


class PackedF32:
    """One float32 weight in MKL's packed layout, tied to the version of the weight it was packed from:
    a weight changed in place afterwards (its version moves) makes `takes` answer False."""

    def __init__(self, weight: torch.Tensor, packed: torch.Tensor) -> None:
        self.source_version = weight._version
        self.packed = packed
        # _mkl_linear reads only the shape and dtype of its "origin weight" when the row counts match,
        # so a zero-stride stand-in of that shape costs no memory.
        self.shape_only = torch.zeros((), dtype=torch.float32).expand(weight.shape)

    def takes(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        return (
            x.dtype == torch.float32
            and x.device.type == "cpu"
            and x.numel() >= MIN_ROWS * x.shape[-1] > 0
            and weight._version == self.source_version
        )

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        return torch.ops.mkl._mkl_linear(x, self.packed, self.shape_only, bias, rows)


def pack(weight: torch.Tensor) -> PackedF32 | None:
    """`weight` [out, in] packed for MKL, or None where it cannot be (not a contiguous float32 CPU weight,
    MKL absent) or where the packed layout fails the row-count check."""
    if not available() or weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2:
        return None
    weight = weight.detach()
    if not weight.is_contiguous() or weight.numel() == 0:
        return None
    with torch.inference_mode():
        packed = PackedF32(weight, torch.ops.mkl._mkl_reorder_linear_weight(weight, PACK_ROWS))
        probe = torch.randn(MIN_ROWS + 1, weight.shape[1], generator=torch.Generator().manual_seed(0))
        expected = nn.functional.linear(probe, weight)
        finite = expected.isfinite()  # outputs an inf / NaN weight spoils are not compared
        scale = float(expected[finite].abs().max()) if finite.any() else 0.0
        wrong = ((packed(probe) - expected).abs() > 1e-4 * scale) & finite
        if bool(wrong.any()):
            log.info("MKL's packed sgemm disagreed with F.linear on a [%d, %d] weight; it stays unpacked",
                     *weight.shape)
            return None
    return packed


def pack_model(model: nn.Module, free_bytes: int) -> int:
    """Pack the float32 weights of `model`'s Linear and LMHead modules (their `packed_f32`) while the
    copies fit in MEMORY_SHARE of `free_bytes`; returns the bytes packed."""
    from shoal.layers.embedding import LMHead
    from shoal.layers.linear import Linear

    if not available():
        return 0
    budget = int(MEMORY_SHARE * free_bytes)
    used = 0
    for module in model.modules():
        if not isinstance(module, (Linear, LMHead)):
            continue
        weight = module.tied_to.weight if isinstance(module, LMHead) and module.tied_to is not None else module.weight
        size = weight.numel() * weight.element_size()
        if weight.dtype != torch.float32 or weight.device.type != "cpu" or used + size > budget:
            continue
        module.packed_f32 = pack(weight)
        used += size if module.packed_f32 is not None else 0
    return used
