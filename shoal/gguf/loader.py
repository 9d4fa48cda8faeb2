"""Builds a model from a GGUF file: config from its metadata, then its tensors streamed one at a time,
renamed to Hugging Face names and reshaped (names.py), into the model's own load_weights.

4-bit files stay 4-bit: a file whose matrices are mostly Q4_0, Q4_1 or Q4_K (Q4_K_S / Q4_K_M) loads
as shoal's int4 group-32 format, and each such tensor goes straight into it with no full-precision
copy: all three are int4 with 32 inputs per (scale, zero) — Q4_K's 256-value super-blocks are eight
such groups — so the layer holds the file's codes and scales exactly (`unpermute_rows` moves whole
rows, so it applies to the codes and scales alike). The other tensors of such a file (a Q4_K_M
file's Q6_K attn_v / ffn_down, llama.cpp's Q6_K output head) load as they are: their layers stay
dense, holding the file's values dequantized exactly, never a second 4-bit rounding. Every other
type (Q5_*, Q6_K, Q8_0, Q2_K, Q3_K, IQ4_*) is dequantized one tensor at a time to the model's dtype
(Q8_0's 32-input blocks do not fit shoal's per-output-channel int8). `--quant` overrides the choice
and re-quantizes what does not already fit, one tensor at a time.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from shoal.backends.base import Backend
from shoal.errors import WeightError
from shoal.gguf.config import load_gguf_config
from shoal.gguf.dequant import FLOAT_TYPES, INT4_TYPES, int4_blocks, to_torch
from shoal.gguf.names import Step, merge_kv_b, plan, unpermute_rows
from shoal.gguf.reader import GGUFFile
from shoal.models import CausalLM, model_class
from shoal.models.hf_config import ModelConfig

GGUF_SUFFIX = ".gguf"
INT4_GROUP = 32  # Q4_0 / Q4_1 blocks and Q4_K sub-blocks


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


def _damaged(file: GGUFFile, name: str) -> WeightError:
    info = file.tensors[name]
    return WeightError(
        f"{file.path}: tensor {name} ({info.type_name}) decodes to non-finite values (a damaged block scale); "
        "the file is corrupt — download or convert it again"
    )


def _tensor(file: GGUFFile, name: str, dtype: torch.dtype, index: int | None = None) -> torch.Tensor:
    """One GGUF tensor (or its `index`-th slice along dim 0) as torch: float types as stored, so float32
    routers stay float32; quantized types dequantized to `dtype`."""
    info = file.tensors[name]
    raw, shape = file.raw(name), info.shape
    if index is not None:
        raw, shape = raw[index], shape[1:]
    if info.type_name in FLOAT_TYPES:
        return to_torch(info.type_name, raw, shape)
    out = to_torch(info.type_name, raw, shape, torch.float32)
    if not bool(torch.isfinite(out).all()):
        raise _damaged(file, name)
    return out.to(dtype)


def _int4(file: GGUFFile, name: str, index: int | None = None, heads: int = 0):
    """A Q4_0 / Q4_1 / Q4_K tensor (or its `index`-th slice) as shoal's Int4GroupWeight, group 32, without
    dequantizing."""
    from shoal.quant.formats import Int4GroupWeight

    raw = file.raw(name) if index is None else file.raw(name)[index]
    values, scales, zero_point, offsets = int4_blocks(file.tensors[name].type_name, raw)
    finite = torch.isfinite(scales).all() and (offsets is None or torch.isfinite(offsets).all())
    if not bool(finite):
        raise _damaged(file, name)
    if heads:
        values, scales = unpermute_rows(values, heads), unpermute_rows(scales, heads)
        offsets = None if offsets is None else unpermute_rows(offsets, heads)
    return Int4GroupWeight.from_uint4(values, scales, INT4_GROUP, zero_point, offsets)


def iterate_gguf_weights(
    file: GGUFFile, steps: list[Step], dtype: torch.dtype, progress: bool = True,
    int4_layer: Callable[[str], bool] = lambda hf_name: False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Hugging Face name, CPU tensor in `dtype`) for every step, one GGUF tensor in memory at a time.
    Where `int4_layer(hf_name)` says the weight lands in an int4 group-32 layer, a Q4_0 / Q4_1 / Q4_K
    tensor comes as an Int4GroupWeight instead, holding the file's own codes."""

    def direct(step: Step, dims: int) -> bool:
        info = file.tensors[step.sources[0]]
        return info.type_name in INT4_TYPES and len(info.shape) == dims and int4_layer(step.hf_name.format(0))

    total = sum(file.tensors[s].n_bytes for step in steps for s in step.sources)
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading GGUF", disable=not progress, leave=False) as bar:
        for step in steps:
            if step.kind == "experts":
                shape = file.tensors[step.sources[0]].shape
                if len(shape) != 3:
                    raise WeightError(f"{file.path}: {step.sources[0]} has shape {list(shape)}; expected 3-D")
                keep = direct(step, 3)
                for index in range(shape[0]):  # one expert at a time: a stacked tensor can be many GB
                    if keep:
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
                if direct(step, 2):
                    yield step.hf_name, _int4(file, step.sources[0], heads=step.heads)
                else:
                    yield step.hf_name, unpermute_rows(_tensor(file, step.sources[0], dtype), step.heads)
            elif direct(step, 2):
                yield step.hf_name, _int4(file, step.sources[0])
            else:
                yield step.hf_name, _tensor(file, step.sources[0], dtype)
            bar.update(sum(file.tensors[s].n_bytes for s in step.sources))


def _check_size(cls: type[CausalLM], config: ModelConfig, backend: Backend, file: GGUFFile) -> CausalLM:
    """Refuse a header whose sizes ask for more parameters than the file holds, before allocating any;
    return the model's skeleton (on the meta device), which knows where each checkpoint name loads."""
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
    return skeleton


def _layers_not_int4(skeleton: CausalLM, steps: list[Step], file: GGUFFile) -> frozenset[str]:
    """The modules whose weights the file holds in a type other than int4 group 32 (a Q4_K_M file's Q6_K
    tensors): they stay dense when the file loads as int4, rather than being rounded to 4 bits again."""
    names = set()
    for step in steps:
        info = file.tensors[step.sources[0]]
        if len(info.shape) >= 2 and info.type_name not in INT4_TYPES:
            names.add(skeleton.weight_destination(step.hf_name.format(0))[0])
    return frozenset(names)


@dataclasses.dataclass
class GGUFModel:
    """A GGUF file opened for loading: its config, the steps that rename its tensors to Hugging Face names,
    and the model's skeleton on the meta device (which knows where each name loads)."""

    file: GGUFFile
    config: ModelConfig
    steps: list[Step]
    skeleton: CausalLM


def open_gguf_model(source: Path | GGUFFile, backend: Backend) -> GGUFModel:
    """Read the header (unless `source` is an opened GGUFFile) and check it against the tensors it holds."""
    file = source if isinstance(source, GGUFFile) else GGUFFile(source)
    config = load_gguf_config(file)
    skeleton = _check_size(model_class(config), config, backend, file)
    return GGUFModel(file, config, plan(list(file.tensors), config, file.architecture), skeleton)


def gguf_quant_plan(gguf: GGUFModel, backend: Backend, quant: str | None, quant_group_size: int | None,
                    prepare: bool = True):
    """The QuantPlan for this file: a mostly Q4_0 / Q4_1 / Q4_K file loads as int4 group 32 (its embedding
    and its non-4-bit layers as they are) unless `quant` names another format."""
    from shoal.quant.plan import plan_quantization

    file = gguf.file
    from_file = quant is None
    if from_file:
        quant, quant_group_size = file_quantization(file)
    elif quant == "int4" and quant_group_size is None and file_quantization(file) == ("int4", INT4_GROUP):
        quant_group_size = INT4_GROUP  # --quant int4 on a 4-bit file: keep its groups of 32 rather than re-round
    quant_plan = plan_quantization(gguf.config, backend, quant, quant_group_size, prepare)
    if from_file and quant_plan is not None:
        # keep the file's own embedding values (not an int8 copy) and its non-4-bit layers as they are
        quant_plan = dataclasses.replace(
            quant_plan, quantize_embeddings=False, keep_dense=_layers_not_int4(gguf.skeleton, gguf.steps, file)
        )
    return quant_plan


def gguf_weights(gguf: GGUFModel, model: CausalLM, dtype: torch.dtype, progress: bool = True):
    """The file's tensors for `model` (built under gguf_quant_plan), as iterate_gguf_weights yields them:
    straight into int4 where the layer is int4 group 32; a pipeline stage's absent layers are not read."""
    from shoal.quant.layers import QuantizedLinear, QuantizedStackedExperts

    modules = dict(model.named_modules())

    def int4_layer(hf_name: str) -> bool:
        module = modules.get(model.weight_destination(hf_name)[0])
        return (
            isinstance(module, (QuantizedLinear, QuantizedStackedExperts))
            and module.fmt == "int4" and module.group_size == INT4_GROUP
        )

    steps = [s for s in gguf.steps if not model.ignore_weight(s.hf_name.format(0))]
    return iterate_gguf_weights(gguf.file, steps, dtype, progress=progress, int4_layer=int4_layer)


def build_gguf_model(
    source: Path | GGUFFile,
    backend: Backend,
    device: torch.device,
    dtype: torch.dtype | None,
    progress: bool = True,
    quant: str | None = None,
    quant_group_size: int | None = None,
    prepare: bool = True,
    kernels: str = "auto",
) -> tuple[CausalLM, ModelConfig, torch.dtype]:
    """Read the GGUF header (unless `source` is an opened GGUFFile), construct the model on `device` and
    load its tensors; a mostly Q4_0 / Q4_1 / Q4_K file loads as int4 group 32 unless `quant` names
    another format."""
    from shoal.construct import choose_dtype, construct_model, load_into

    gguf = open_gguf_model(source, backend)
    dtype = choose_dtype(gguf.config, backend, dtype)
    quant_plan = gguf_quant_plan(gguf, backend, quant, quant_group_size, prepare)
    model = construct_model(gguf.config, backend, device, dtype, quant_plan, kernels)
    weights = gguf_weights(gguf, model, dtype, progress)
    return load_into(model, weights, weights.close, quant_plan), gguf.config, dtype


def file_quantization(file: GGUFFile) -> tuple[str | None, int | None]:
    """The shoal format that holds the file exactly: ("int4", 32) when Q4_0 / Q4_1 / Q4_K hold more of the
    matrix bytes than any other type, else (None, None): the weights load dense."""
    by_type: dict[str, int] = {}
    for info in file.tensors.values():
        if len(info.shape) >= 2:
            kind = "int4" if info.type_name in INT4_TYPES else info.type_name
            by_type[kind] = by_type.get(kind, 0) + info.n_bytes
    if not by_type:
        return None, None
    return ("int4", INT4_GROUP) if max(by_type, key=by_type.get) == "int4" else (None, None)
