"""Builds a model from a GGUF file: config from its metadata, then its tensors streamed one at a time,
renamed to Hugging Face names and reshaped (names.py), into the model's own load_weights.

Q8_0 and Q4_0 tensors are dequantized to the model's dtype here for now. Where shoal's int8 / int4
weight formats plug in: `_tensor` is the one place a GGUF tensor becomes a torch tensor; a quantized
linear layer would instead take `q8_0_blocks` / `q4_0_blocks` of the same bytes (after the same
`unpermute_rows`, which moves whole rows and so applies to values and scales alike).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from shoal.backends.base import Backend
from shoal.errors import WeightError
from shoal.gguf.config import load_gguf_config
from shoal.gguf.dequant import to_torch
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


def iterate_gguf_weights(
    file: GGUFFile, steps: list[Step], dtype: torch.dtype, progress: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Hugging Face name, CPU tensor in `dtype`) for every step, one GGUF tensor in memory at a time."""
    total = sum(file.tensors[s].n_bytes for step in steps for s in step.sources)
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading GGUF", disable=not progress, leave=False) as bar:
        for step in steps:
            if step.kind == "experts":
                shape = file.tensors[step.sources[0]].shape
                if len(shape) != 3:
                    raise WeightError(f"{file.path}: {step.sources[0]} has shape {list(shape)}; expected 3-D")
                for index in range(shape[0]):  # one expert at a time: a stacked tensor can be many GB
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
                w = _tensor(file, step.sources[0], dtype)
                if w.shape[0] % (2 * step.heads):
                    raise WeightError(f"{file.path}: {step.sources[0]} has {w.shape[0]} rows, not 2 per head dimension")
                yield step.hf_name, unpermute_rows(w, step.heads)
            else:
                yield step.hf_name, _tensor(file, step.sources[0], dtype)
            bar.update(sum(file.tensors[s].n_bytes for s in step.sources))


def _check_size(cls: type[CausalLM], config: ModelConfig, backend: Backend, file: GGUFFile) -> None:
    """Refuse a header whose sizes ask for more parameters than the file holds, before allocating any."""
    with torch.device("meta"):
        skeleton = cls(config, backend)
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
    path: Path, backend: Backend, device: torch.device, dtype: torch.dtype | None, progress: bool = True
) -> tuple[CausalLM, ModelConfig, torch.dtype]:
    """Read the GGUF header, construct the model on `device` and load its tensors."""
    from shoal.loader import _default_dtype, choose_dtype

    file = GGUFFile(path)
    config = load_gguf_config(file)
    cls = model_class(config)
    dtype = choose_dtype(config, backend, dtype)
    _check_size(cls, config, backend, file)
    steps = plan(list(file.tensors), config, file.architecture)
    with _default_dtype(dtype), torch.device(device):
        model = cls(config, backend)
    weights = iterate_gguf_weights(file, steps, dtype, progress=progress)
    try:
        model.load_weights(weights)
    finally:
        weights.close()
    model.eval()
    return model, config, dtype
