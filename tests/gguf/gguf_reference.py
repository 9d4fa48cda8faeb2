"""What shoal loads from a GGUF file, tensor by tensor, against the gguf package's own reading of the same
file (GGUFReader + gguf.quants.dequantize): the outside reference for every GGUF type."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from shoal.backends import get_backend
from shoal.gguf import build_gguf_model, int4_blocks
from shoal.gguf.dequant import INT4_TYPES
from shoal.gguf.names import unpermute_rows
from shoal.models.base import CausalLM
from shoal.quant.formats import Int4GroupWeight


# rows of 256 and 512 values, so that llama.cpp's K-quants (256-value super-blocks) apply to every matrix
LLAMA_256 = dict(hidden_size=256, intermediate_size=512, initializer_range=0.05)
HEADS, KV_HEADS = 4, 2  # tests/checkpoints.py's llama
IDS = torch.arange(2, 34)[None]


def shoal_logits(model, ids: torch.Tensor) -> torch.Tensor:
    cache = model.make_cache(1, ids.shape[1], torch.float32, "cpu")
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(ids.shape[1])[None], cache))[0]


def transformers_from_gguf(path):
    """transformers' own GGUF reader (gguf.quants underneath) on the same file: an outside reference model."""
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict(tensors, strict=True)
    return model


def reference_tensors(path: Path) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """GGUF name -> (type name, raw data, float32 values [row-major shape]) as the gguf package reads them."""
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        out[t.name] = (t.tensor_type.name, t.data, values)
    return out


def load_recording(path: Path, monkeypatch, **options) -> tuple[CausalLM, list[tuple[str, object]]]:
    """Build the model from `path` in float32, recording every (checkpoint name, value) its load_weights gets."""
    seen: list[tuple[str, object]] = []
    original = CausalLM.load_weights

    def recording(self, weights):
        def stream():
            for name, value in weights:
                seen.append((name, value))
                yield name, value

        return original(self, stream())

    monkeypatch.setattr(CausalLM, "load_weights", recording)
    model, _, _ = build_gguf_model(path, get_backend("cpu"), torch.device("cpu"), torch.float32, progress=False, **options)
    monkeypatch.setattr(CausalLM, "load_weights", original)
    return model, seen


def _gguf_name(hf_name: str) -> tuple[str, int]:
    """Hugging Face llama name -> (GGUF name, heads to un-permute by: 0 for none; the caller fills them in)."""
    from shoal.gguf.names import _GLOBAL, _LAYER

    for g, h in _GLOBAL.items():
        if h == hf_name:
            return g, 0
    _, _, layer, rest = hf_name.split(".", 3)
    module, _, suffix = rest.rpartition(".")
    part = next(k for k, v in _LAYER.items() if v == module)
    return f"blk.{layer}.{part}.{suffix}", part in ("attn_q", "attn_k")


def check_exact(path: Path, seen: list[tuple[str, object]], heads: int, kv_heads: int) -> dict[str, int]:
    """Every loaded llama weight equals gguf.quants.dequantize of its GGUF tensor exactly: a dense weight
    value for value; an int4 one (Q4_0 / Q4_1 / Q4_K) as the file's own 4-bit codes and float32 scales,
    whose value * scale + offset is gguf's dequantized tensor bit for bit. Returns loaded counts by type."""
    ref = reference_tensors(path)
    counts: dict[str, int] = {}
    for hf_name, value in seen:
        name, permuted = _gguf_name(hf_name)
        type_name, raw, expected = ref[name]
        expected = torch.from_numpy(expected)
        n_heads = (heads if ".attn_q." in name else kv_heads) if permuted else 0
        if n_heads:
            expected = unpermute_rows(expected, n_heads)
        if isinstance(value, Int4GroupWeight):
            assert type_name in INT4_TYPES, f"{name} ({type_name}) reached an int4 layer without a second rounding"
            u, scales, zero, offsets = int4_blocks(type_name, raw)
            if n_heads:
                u, scales = unpermute_rows(u, n_heads), unpermute_rows(scales, n_heads)
                offsets = None if offsets is None else unpermute_rows(offsets, n_heads)
            assert torch.equal(value.unpacked(), u) and torch.equal(value.scales.float(), scales.float()), name
            g = u.float().view(*u.shape[:-1], -1, 32)
            s = scales.float()[..., None]
            exact = (g - zero) * s if offsets is None else g * s + offsets[..., None]
            assert torch.equal(exact.reshape(expected.shape), expected), name
            # the layer's (scale, zero) form (w = (u - 8) * scale + zero, torch's int4 convention) rounds
            # zero = 8 * scale + offset once in float32: a few ulps of the group's magnitude
            err = (value.dequantize() - expected).abs().view(*u.shape[:-1], -1, 32).amax(-1)
            size = 16 * scales.float().abs() + (0 if offsets is None else offsets.abs())
            assert bool((err <= 4 * torch.finfo(torch.float32).eps * size).all()), name
            kind = f"{type_name}->int4"
        else:
            assert value.dtype == torch.float32 or type_name in ("F16", "BF16"), (name, value.dtype)
            assert torch.equal(value.float(), expected), f"{name} ({type_name}) differs from gguf.quants.dequantize"
            kind = type_name
        counts[kind] = counts.get(kind, 0) + 1
    assert len(seen) == len([n for n in ref if n != "rope_freqs.weight"])
    return counts
