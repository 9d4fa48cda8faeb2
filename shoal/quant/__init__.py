"""Lighter weights: int8 per channel, int4 in groups and fp8 in 128 x 128 blocks, as a property of the
linear layers (shoal/quant/layers.py), chosen at load (`LLM(model, quant=...)`, `--quant`) or written
offline (`shoal quantize`) in compressed-tensors' or DeepSeek-V3's own layouts.
"""

from shoal.quant.formats import Fp8BlockWeight, Int4GroupWeight, Int8ChannelWeight, QuantizedWeight
from shoal.quant.plan import QUANT_METHODS

__all__ = ["QUANT_METHODS", "Fp8BlockWeight", "Int4GroupWeight", "Int8ChannelWeight", "QuantizedWeight"]
