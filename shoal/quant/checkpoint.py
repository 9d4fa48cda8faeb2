"""Quantized checkpoints on disk: reading them (one weight at a time, as the loader streams them) and the
tensor encodings the offline writer uses.

Two existing layouts, rather than one of our own:
  - compressed-tensors "pack-quantized" (what llm-compressor writes and vLLM loads): per weight
    `weight_packed` (int32, 32 / bits values per int32 along the input dimension, first value in the
    lowest bits, stored unsigned: value + 2^(bits-1)), `weight_scale`, `weight_shape`, and for
    asymmetric schemes `weight_zero_point` (int32, packed the same way but along the output dimension);
    w = (q - zero_point) * scale with q and zero_point signed. int4 groups and int8 channels use it.
  - DeepSeek-V3's fp8: `weight` in float8_e4m3fn and `weight_scale_inv` float32, one per 128 x 128 block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterator

import torch

from shoal.errors import ConfigError, WeightError
from shoal.quant.formats import FP8_BLOCK, Fp8BlockWeight, Int4GroupWeight, Int8ChannelWeight

Weights = Iterator[tuple[str, object]]


# ---- int32 packing (compressed-tensors' pack_to_int32 / unpack_from_int32 layout) ---------------------
def pack_int32(values: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Unsigned values [rows, cols] (0 .. 2^bits - 1) -> int32, 32 // bits per int32 along `dim`, zero-padded."""
    per = 32 // bits
    v = values.to(torch.int64)
    if dim == 0:
        return pack_int32(values.t(), bits, 1).t().contiguous()
    pad = (-v.shape[1]) % per
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    v = v.view(v.shape[0], -1, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    packed = (v << shifts).sum(dim=-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, size: int, dim: int = 1) -> torch.Tensor:
    """The inverse of pack_int32: int32 -> unsigned values (int32) with `size` entries along `dim`."""
    if dim == 0:
        return unpack_int32(packed.t(), bits, size, 1).t().contiguous()
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    values = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    return values.flatten(-2)[:, :size]


# ---- reading --------------------------------------------------------------------------------------------
@dataclass
class CheckpointFormat:
    """How a checkpoint stores its weights; `kind` is the shoal format it holds ("int8", "int4", "fp8")."""

    kind: str
    group_size: int | None = None
    raw: dict = field(default_factory=dict)

    def wrap(self, weights: Weights) -> Weights:
        raise NotImplementedError


class Fp8BlockCheckpoint(CheckpointFormat):
    """DeepSeek-V3's own layout. A weight and its scale arrive as two tensors: hold the first until the other."""

    def wrap(self, weights: Weights) -> Weights:
        held_weights: dict[str, torch.Tensor] = {}
        held_scales: dict[str, torch.Tensor] = {}
        for name, tensor in weights:
            if name.endswith(".weight_scale_inv"):
                key = name[: -len("_scale_inv")]
                if key in held_weights:
                    yield key, Fp8BlockWeight(held_weights.pop(key), tensor)
                else:
                    held_scales[key] = tensor
            elif isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float8_e4m3fn:
                if name in held_scales:
                    yield name, Fp8BlockWeight(tensor, held_scales.pop(name))
                else:
                    held_weights[name] = tensor
            else:
                yield name, tensor
        orphans = sorted(held_weights) + sorted(held_scales)
        if orphans:
            raise WeightError(
                f"fp8 weight {orphans[0]} has no matching weight / weight_scale_inv partner in the checkpoint; "
                "the files are incomplete"
            )


_CT_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


class CompressedTensorsCheckpoint(CheckpointFormat):
    """compressed-tensors pack-quantized: int4 with groups (symmetric or with zero points) or int8 per channel."""

    def __init__(self, raw: dict) -> None:
        groups = raw.get("config_groups") or {}
        self.schemes: list[tuple[list[str], dict]] = []
        for group in groups.values():
            weights = (group or {}).get("weights") or {}
            self.schemes.append((list(group.get("targets") or ["Linear"]), weights))
        if not self.schemes:
            raise ConfigError("compressed-tensors quantization_config has no config_groups with weights")
        for _, w in self.schemes:
            bits, strategy = w.get("num_bits"), w.get("strategy")
            ok = w.get("type", "int") == "int" and (
                (bits == 4 and strategy in ("group", "channel")) or (bits == 8 and strategy == "channel")
            )
            if not ok or w.get("actorder") not in (None, False, "null"):
                raise ConfigError(
                    f"compressed-tensors scheme {w} is not supported; shoal reads pack-quantized int4 "
                    "(group or channel, with or without zero points) and int8 per channel, without act-order"
                )
        first = self.schemes[0][1]
        kind = "int4" if first["num_bits"] == 4 else "int8"
        group = first.get("group_size") if first.get("strategy") == "group" else None
        super().__init__(kind, group, raw)

    def scheme_for(self, module: str) -> dict:
        for targets, scheme in self.schemes:
            for target in targets:
                if target == "Linear" or module == target or module.endswith("." + target):
                    return scheme
                if target.startswith("re:") and re.match(target[3:], module):
                    return scheme
        return self.schemes[0][1]

    def wrap(self, weights: Weights) -> Weights:
        held: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in weights:
            module, _, suffix = name.rpartition(".")
            if suffix not in _CT_SUFFIXES:
                yield name, tensor
                continue
            parts = held.setdefault(module, {})
            parts[suffix] = tensor
            scheme = self.scheme_for(module)
            needed = {"weight_packed", "weight_scale", "weight_shape"}
            if not scheme.get("symmetric", True):
                needed.add("weight_zero_point")
            if needed <= parts.keys():
                yield f"{module}.weight", self.decode(held.pop(module), scheme, module)
        if held:
            module, parts = next(iter(held.items()))
            raise WeightError(f"{module} lacks {', '.join(sorted(set(_CT_SUFFIXES[:4]) - parts.keys()))}; the files are incomplete")

    @staticmethod
    def decode(parts: dict[str, torch.Tensor], scheme: dict, module: str):
        if "weight_g_idx" in parts:
            raise WeightError(f"{module} uses act-order (weight_g_idx), which shoal does not read")
        out, n = (int(v) for v in parts["weight_shape"].tolist())
        bits = int(scheme["num_bits"])
        u = unpack_int32(parts["weight_packed"], bits, n)
        scale = parts["weight_scale"]
        half = 1 << (bits - 1)
        if bits == 8:
            return Int8ChannelWeight((u - half).to(torch.int8), scale.reshape(out))
        zp = half
        if not scheme.get("symmetric", True):
            zp = unpack_int32(parts["weight_zero_point"], bits, out, dim=0).to(torch.float32)
        group = n // scale.shape[-1]
        return Int4GroupWeight.from_uint4(u, scale, group, zero_point=zp)


def checkpoint_format(quantization_config: dict | None) -> CheckpointFormat | None:
    """What config.json's `quantization_config` says about the weights, or None for plain tensors."""
    if not quantization_config:
        return None
    method = quantization_config.get("quant_method")
    if method == "fp8":
        block = quantization_config.get("weight_block_size")
        fmt = quantization_config.get("fmt", "e4m3")
        if list(block or []) != [FP8_BLOCK, FP8_BLOCK] or fmt != "e4m3":
            raise ConfigError(
                f"fp8 checkpoint with fmt {fmt!r} and weight_block_size {block} is not supported; shoal reads "
                "DeepSeek-V3's layout (e4m3, weight_block_size [128, 128])"
            )
        return Fp8BlockCheckpoint("fp8", None, quantization_config)
    if method == "compressed-tensors":
        fmt = quantization_config.get("format")
        if fmt != "pack-quantized":
            raise ConfigError(f"compressed-tensors format {fmt!r} is not supported; shoal reads 'pack-quantized'")
        return CompressedTensorsCheckpoint(quantization_config)
    raise ConfigError(
        f"quantization method {method!r} in config.json is not supported; shoal reads fp8 (DeepSeek-V3 block "
        "scales) and compressed-tensors pack-quantized checkpoints"
    )


# ---- writing --------------------------------------------------------------------------------------------
def encode(value, prefix: str) -> dict[str, torch.Tensor]:
    """Checkpoint tensors for one quantized weight named `prefix`.weight."""
    if isinstance(value, Fp8BlockWeight):
        return {f"{prefix}.weight": value.weight.contiguous(), f"{prefix}.weight_scale_inv": value.scale_inv.contiguous()}
    if isinstance(value, Int8ChannelWeight):
        out, n = value.shape
        return {
            f"{prefix}.weight_packed": pack_int32(value.qweight.to(torch.int16) + 128, 8),
            f"{prefix}.weight_scale": value.scales.reshape(out, 1).contiguous(),
            f"{prefix}.weight_shape": torch.tensor([out, n], dtype=torch.int64),
        }
    out, n = value.shape
    return {
        f"{prefix}.weight_packed": pack_int32(value.unpacked(), 4),
        f"{prefix}.weight_scale": value.scales.contiguous(),
        f"{prefix}.weight_zero_point": pack_int32(value.zero_points(), 4, dim=0),
        f"{prefix}.weight_shape": torch.tensor([out, n], dtype=torch.int64),
    }


def quantization_config(kind: str, group_size: int, ignore: list[str]) -> dict:
    """config.json's quantization_config for what `shoal quantize` writes."""
    if kind == "fp8":
        return {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
        }
    weights = {
        "num_bits": 4 if kind == "int4" else 8,
        "type": "int",
        "symmetric": kind != "int4",
        "strategy": "group" if kind == "int4" else "channel",
        "group_size": group_size if kind == "int4" else None,
        "dynamic": False,
        "actorder": None,
        "block_structure": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None, "output_activations": None}
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
    }
