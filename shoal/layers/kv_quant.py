"""Quantized KV cache entries: int8 or fp8 (e4m3) values with one float32 scale per token and head.

`--kv-cache-dtype int8|fp8` stores each cached vector (one head's key or value, or MLA's latent) as
8-bit codes plus a scale = absmax / code_max, so the cache holds about twice as many tokens as in
bf16 (four times as in fp32). Reads dequantize to the compute dtype right after the paged gather;
attention itself runs unchanged. fp8 codes are kept as raw bytes (uint8) in the pool so the scatter
and gather work on every device, fp8 support or not; only the conversion needs float8 casts, which
PyTorch provides everywhere.
"""

from __future__ import annotations

import torch

from shoal.errors import ConfigError

KV_CACHE_DTYPES = ("auto", "int8", "fp8")

# code dtype, how codes are stored in the pool, largest code magnitude
_FORMATS = {
    "int8": (torch.int8, torch.int8, 127.0),
    "fp8": (torch.float8_e4m3fn, torch.uint8, 448.0),
}


def parse_kv_cache_dtype(name: str | None) -> str | None:
    """None for a cache in the compute dtype ("auto"), else the quantized format's name."""
    if name is None or name == "auto":
        return None
    if name == "fp8_e4m3":  # vLLM's spelling
        name = "fp8"
    if name not in _FORMATS:
        raise ConfigError(f"unknown kv_cache_dtype {name!r}; use one of {', '.join(KV_CACHE_DTYPES)}")
    return name


def storage_dtype(kind: str) -> torch.dtype:
    return _FORMATS[kind][1]


def bytes_per_entry(shape: tuple[int, ...], kind: str | None, dtype: torch.dtype) -> int:
    """Cache bytes of one token's entry of `shape`: codes plus one float32 scale per vector."""
    numel = int(torch.Size(shape).numel())
    if kind is None:
        return numel * torch.empty(0, dtype=dtype).element_size()
    vectors = numel // shape[-1]
    return numel + 4 * vectors


def quantize(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., d] -> (codes [..., d] in the pool's storage dtype, float32 scales [..., 1])."""
    code_dtype, stored, code_max = _FORMATS[kind]
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / code_max
    scaled = x / scale
    if kind == "int8":
        codes = scaled.round_().clamp_(-code_max, code_max).to(torch.int8)
    else:
        codes = scaled.clamp_(-code_max, code_max).to(code_dtype).view(stored)
    return codes, scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of quantize, in `dtype`."""
    code_dtype = _FORMATS[kind][0]
    if kind == "fp8":
        codes = codes.view(code_dtype)
    return (codes.to(torch.float32) * scale).to(dtype)
