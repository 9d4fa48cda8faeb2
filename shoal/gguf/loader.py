"""Builds a model from a GGUF file: config from its metadata, then its tensors streamed one at a time,
renamed to Hugging Face names and reshaped (names.py), into the model's own load_weights.

Q4_0 files stay 4-bit: a file whose matrices are mostly Q4_0 loads as shoal's int4 group-32 format,
and each Q4_0 tensor goes straight into it — Q4_0 *is* int4 with 32 inputs per scale and a zero
point of 8 — with no full-precision copy (`unpermute_rows` moves whole rows, so it applies to the
codes and scales alike); the embedding and output head keep the file's values exactly (dequantized).
Q8_0's 32-input blocks do not fit shoal's per-output-channel int8, so Q8_0 tensors are dequantized
exactly by default, and `--quant int8` re-quantizes them per channel one tensor at a time (one more
rounding, half the memory). `--quant` always overrides the choice. Anything a layer keeps dense is
dequantized to the model's dtype.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from shoal.backends.base import Backend
from shoal.errors import WeightError
from shoal.gguf.config import load_gguf_config
from shoal.gguf.dequant import q4_0_blocks, to_torch
from shoal.gguf.names import Step, merge_kv_b, plan, unpermute_rows
from shoal.gguf.reader import GGUFFile
from shoal.models import CausalLM, model_class
from shoal.models.hf_config import ModelConfig

GGUF_SUFFIX = ".gguf"


def is_gguf(path: str | Path) -> bool:
    """A file named *.gguf, or any file that starts with the GGUF magic."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == GGUF_SUFFIX:
        return True
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _tensor(file: GGUFFile, name: str, dtype: torch.dtype, index: int | None = None) -> torch.Tensor:
    """One GGUF tensor (or its `index`-th slice along dim 0) as torch: float types as stored, so float32
    routers stay float32; quantized types dequantized to `dtype`."""
    info = file.tensors[name]
    raw, shape = file.raw(name), info.shape
    if index is not None:
        raw, shape = raw[index], shape[1:]
    quantized = info.type_name not in ("F32", "F16", "BF16")
    return to_torch(info.type_name, raw, shape, dtype if quantized else None)


def _int4(file: GGUFFile, name: str, index: int | None = None, heads: int = 0):
    """A Q4_0 tensor (or its `index`-th slice) as shoal's Int4GroupWeight, group 32, without dequantizing."""
    from shoal.quant.formats import Int4GroupWeight

    raw = file.raw(name) if index is None else file.raw(name)[index]
    values, scales, zero_point = q4_0_blocks(raw)
    if heads:
        values, scales = unpermute_rows(values, heads), unpermute_rows(scales, heads)
    return Int4GroupWeight.from_uint4(values, scales, 32, zero_point)


def iterate_gguf_weights(
    file: GGUFFile, steps: list[Step], dtype: torch.dtype, progress: bool = True, keep_q4_0: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Hugging Face name, CPU tensor in `dtype`) for every step, one GGUF tensor in memory at a time.
    With keep_q4_0, Q4_0 matrices come as Int4GroupWeight instead (the model's int4 layers keep them)."""

    def direct(source: str, dims: int) -> bool:
        info = file.tensors[source]
        return keep_q4_0 and info.type_name == "Q4_0" and len(info.shape) == dims
    total = sum(file.tensors[s].n_bytes for step in steps for s in step.sources)
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading GGUF", disable=not progress, leave=False) as bar:
        for step in steps:
            if step.kind == "experts":
                shape = file.tensors[step.sources[0]].shape
                if len(shape) != 3:
                    raise WeightError(f"{file.path}: {step.sources[0]} has shape {list(shape)}; expected 3-D")
                for index in range(shape[0]):  # one expert at a time: a stacked tensor can be many GB
                    if direct(step.sources[0], 3):
                        yield step.hf_name.format(index), _int4(file, step.sources[0], index)
                    else:
                        yield step.hf_name.format(index), _tensor(file, step.sources[0], dtype, index)
            elif step.kind == "kv_b":
                k_b, v_b = (_tensor(file, s, dtype) for s in step.sources)
                if k_b.dim() != 3 or v_b.dim() != 3 or k_b.shape[0] != v_b.shape[0] or k_b.shape[1] != v_b.shape[2]:
                    raise WeightError(
                        f"{file.path}: {step.sources[0]} {list(k_b.shape)} and {step.sources[1]} {list(v_b.shape)} "
                        "do not form one kv_b_proj"
                    )
                yield step.hf_name, merge_kv_b(k_b, v_b)
            elif step.kind == "unpermute":
                rows = file.tensors[step.sources[0]].shape[0]
                if rows % (2 * step.heads):
                    raise WeightError(f"{file.path}: {step.sources[0]} has {rows} rows, not 2 per head dimension")
                if direct(step.sources[0], 2):
                    yield step.hf_name, _int4(file, step.sources[0], heads=step.heads)
                else:
                    yield step.hf_name, unpermute_rows(_tensor(file, step.sources[0], dtype), step.heads)
            elif direct(step.sources[0], 2):
                yield step.hf_name, _int4(file, step.sources[0])
            else:
                yield step.hf_name, _tensor(file, step.sources[0], dtype)
            bar.update(sum(file.tensors[s].n_bytes for s in step.sources))


def _check_size(cls: type[CausalLM], config: ModelConfig, backend: Backend, file: GGUFFile) -> None:
    """Refuse a header whose sizes ask for more parameters than the file holds, before allocating any."""
    from shoal.construct import build_on_meta

    skeleton = build_on_meta(cls, config, backend, torch.get_default_dtype())
    needed = sum(p.numel() for p in skeleton.parameters())
    held = 0
    for t in file.tensors.values():
        count = 1
        for d in t.shape:
            count *= d
        held += count
    if needed > held:
        raise WeightError(
            f"{file.path}: its metadata describes a model of {needed:,} parameters but the file holds only "
            f"{held:,} values; the header and the tensors disagree"
        )


def build_gguf_model(
    path: Path,
    backend: Backend,
    device: torch.device,
    dtype: torch.dtype | None,
    progress: bool = True,
    quant: str | None = None,
    quant_group_size: int | None = None,
    prepare: bool = True,
    kernels: str = "auto",
) -> tuple[CausalLM, ModelConfig, torch.dtype]:
    """Read the GGUF header, construct the model on `device` and load its tensors; a Q4_0 file loads as
    int4 group 32 unless `quant` names another format."""
    from shoal.construct import choose_dtype, construct_model, load_into
    from shoal.quant.plan import plan_quantization

    file = GGUFFile(path)
    config = load_gguf_config(file)
    dtype = choose_dtype(config, backend, dtype)
    _check_size(model_class(config), config, backend, file)
    steps = plan(list(file.tensors), config, file.architecture)
    from_file = quant is None
    if from_file:
        quant, quant_group_size = file_quantization(file)
    quant_plan = plan_quantization(config, backend, quant, quant_group_size, prepare)
    if from_file and quant_plan is not None:  # keep the file's own embedding values, not an int8 copy of them
        quant_plan = dataclasses.replace(quant_plan, quantize_embeddings=False)
    model = construct_model(config, backend, device, dtype, quant_plan, kernels)
    keep_q4_0 = quant_plan is not None and quant_plan.fmt == "int4" and quant_plan.group_size == 32
    weights = iterate_gguf_weights(file, steps, dtype, progress=progress, keep_q4_0=keep_q4_0)
    return load_into(model, weights, weights.close, quant_plan), config, dtype


def file_quantization(file: GGUFFile) -> tuple[str | None, int | None]:
    """The shoal format that holds the file exactly: ("int4", 32) when most matrix bytes are Q4_0, else
    (None, None): float and Q8_0 weights load dense."""
    by_type: dict[str, int] = {}
    for info in file.tensors.values():
        if len(info.shape) >= 2:
            by_type[info.type_name] = by_type.get(info.type_name, 0) + info.n_bytes
    if not by_type:
        return None, None
    return ("int4", 32) if max(by_type, key=by_type.get) == "Q4_0" else (None, None)
