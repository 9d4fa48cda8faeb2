"""bf16 weights re-laid out once by oneDNN for the CPU's batched decode matmuls (9 to 32 rows).

Given a plain [out, in] weight, `F.linear` has oneDNN re-lay it into its blocked format on every call;
for a decode step of 9-32 sequences that re-layout costs about as much as the multiply itself. A copy
packed once at load (`torch.ops.mkldnn._reorder_linear_weight`) and multiplied with
`torch.ops.mkldnn._linear_pointwise` gives the same bits as `F.linear` at 1.1-2x its speed (ad-hoc
timings on this machine's 2-core AMX Xeon, llama-34m and 0.5B Llama shapes, 1 and 2 threads; the
engine-level figure is `benchmarks/offline_throughput.py`'s). Batch-1 to 8 decode keeps shoal's own
matrix-vector kernels on the plain weight (cpu_gemv.c), and prefill keeps `F.linear`, so the packed
copy is an addition: it costs the bf16 weights' bytes once more. `pack_model` therefore packs only
where those bytes fit within a quarter of the memory available at load (SHOAL_CPU_PACKED_WEIGHTS=1
packs whatever the size, =0 never).
"""

from __future__ import annotations

import functools
import logging
import os

import torch
from torch import nn

from shoal.backends.cpu_build import switched_off

log = logging.getLogger(__name__)

ENV_SWITCH = "SHOAL_CPU_PACKED_WEIGHTS"
MIN_ROWS, MAX_ROWS = 9, 32  # below: cpu_gemv's kernels; above: F.linear's own re-layout pays for itself
MEMORY_SHARE = 0.25  # of the memory available at load, at most, for the packed copies (unless forced)


@functools.lru_cache(maxsize=1)
def supported() -> bool:
    """Whether this torch build and CPU multiply packed bf16 weights natively (oneDNN with AVX512-BF16 / AMX)."""
    try:
        return (
            torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        )
    except (AttributeError, RuntimeError):
        return False


def applies(x: torch.Tensor, rows: int) -> bool:
    return MIN_ROWS <= rows <= MAX_ROWS and x.dtype == torch.bfloat16 and x.is_cpu


def matmul(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [rows, in] bf16 times a packed weight (+ bias): what F.linear gives on the plain weight."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def _packable(module: nn.Module) -> torch.Tensor | None:
    """The plain bf16 CPU weight a Linear, MergedLinear or LMHead multiplies by, else None."""
    from shoal.layers.embedding import LMHead, VocabEmbedding
    from shoal.layers.linear import Linear, MergedLinear

    w = None
    if type(module) in (Linear, MergedLinear):
        w = module.weight
    elif type(module) is LMHead and (module.tied_to is None or type(module.tied_to) is VocabEmbedding):
        w = module.matrix
    if w is not None:
        if w.dtype == torch.bfloat16 and w.device.type == "cpu" and w.dim() == 2 and w.is_contiguous():
            return w
    return None


def _available_bytes() -> int:
    from shoal.backends.cpu import system_memory

    return system_memory().free_bytes


def pack_model(model: nn.Module) -> int:
    """Give every plain bf16 linear layer of `model` a packed copy (`module.packed_weight`) if they all fit
    the memory rule above; returns the bytes packed (0 when none)."""
    force = os.environ.get(ENV_SWITCH, "").strip().lower() in ("1", "true", "yes", "on")
    if switched_off(ENV_SWITCH) or not supported():
        return 0
    targets = [(m, w) for m in model.modules() if (w := _packable(m)) is not None]
    total = sum(w.numel() * w.element_size() for _, w in targets)
    if not targets:
        return 0
    available = _available_bytes()
    if not force and total > MEMORY_SHARE * available:
        log.info("bf16 weights not packed for batched decode: %d MiB would exceed %d%% of the %d MiB available "
                 "(%s=1 packs anyway)", total >> 20, int(MEMORY_SHARE * 100), available >> 20, ENV_SWITCH)
        return 0
    with torch.no_grad():
        for module, w in targets:
            module.packed_weight = torch.ops.mkldnn._reorder_linear_weight(w, MAX_ROWS)
    log.info("packed %d bf16 weights (%d MiB) for batched decode of %d-%d sequences", len(targets), total >> 20,
             MIN_ROWS, MAX_ROWS)
    return total
