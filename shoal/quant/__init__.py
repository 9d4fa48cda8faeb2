"""Lighter weights: int8 per channel, int4 in groups and fp8 in 128 x 128 blocks, as a property of the
linear layers (shoal/quant/layers.py), chosen at load (`LLM(model, quant=...)`, `--quant`) or written
offline (`shoal quantize`) in compressed-tensors' or DeepSeek-V3's own layouts.

The formats are imported on first use, so `shoal --help` (which imports shoal.quant.cli) stays fast.
"""

QUANT_METHODS = ("int8", "int4", "fp8")

__all__ = ["QUANT_METHODS", "Fp8BlockWeight", "Int4GroupWeight", "Int8ChannelWeight", "QuantizedWeight"]


def __getattr__(name: str):
    if name in ("Fp8BlockWeight", "Int4GroupWeight", "Int8ChannelWeight", "QuantizedWeight"):
        from shoal.quant import formats

        return getattr(formats, name)
    raise AttributeError(f"module 'shoal.quant' has no attribute {name!r}")
