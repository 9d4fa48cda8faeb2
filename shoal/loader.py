"""Finds a checkpoint (a Hugging Face folder, a GGUF file, or a hub id when huggingface_hub and a network
exist), builds its model on the target device and streams the safetensors weights into it.

Weights are read with safetensors only — never unpickled — one tensor at a time, so peak host memory
stays near one tensor rather than one model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from shoal.backends.base import Backend
from shoal.construct import choose_dtype, construct_model, load_into
from shoal.errors import ConfigError, ModelNotFoundError, WeightError
from shoal.gguf.reader import GGUFFile
from shoal.models import CausalLM
from shoal.models.hf_config import ModelConfig, estimated_parameters, load_model_config

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(model: str | Path) -> Path:
    """A local folder as is; 'org/name' through huggingface_hub when it is installed; else a clear error."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        from shoal.gguf import is_gguf

        if is_gguf(path):
            return path
        raise ModelNotFoundError(
            f"{model} is a file but not a GGUF file; point --model at a *.gguf file or a checkpoint folder "
            "holding config.json and *.safetensors"
        )
    if _HUB_ID.match(str(model)):
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise ModelNotFoundError(
                f"no folder {model}; to download it from the Hugging Face hub, install huggingface_hub "
                "(pip install 'shoal[hub]') or pass a local checkpoint folder"
            ) from None
        try:
            return Path(
                snapshot_download(
                    str(model),
                    allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja"],
                )
            )
        except Exception as exc:  # network, auth or missing repo: all end the same way for the user
            raise ModelNotFoundError(f"could not download {model} from the hub: {exc}") from None
    raise ModelNotFoundError(f"no checkpoint folder at {model}; pass a folder holding config.json and *.safetensors")


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint folder, following model.safetensors.index.json when present."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise WeightError(f"cannot read {index}: {exc}") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightError(f"{index.name} lists shard(s) that are not in {path}: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise WeightError(
            f"{path} has only pickle weights (*.bin / *.pt); shoal never unpickles files for safety. "
            "Convert them to safetensors first (transformers: model.save_pretrained(dir, safe_serialization=True))"
        )
    raise WeightError(f"no *.safetensors weights in {path}")


def iterate_weights(files: list[Path], progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, CPU tensor) for every tensor in the files, with a progress bar over bytes."""
    from safetensors import safe_open

    handles = []
    total = 0
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as exc:  # SafetensorError for truncated or corrupt headers
            raise WeightError(f"{file} is damaged or truncated ({exc}); download or copy it again") from None
        handles.append((file, handle))
        total += file.stat().st_size
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not progress, leave=False) as bar:
        for file, handle in handles:
            for name in handle.keys():
                try:
                    tensor = handle.get_tensor(name)
                except Exception as exc:
                    raise WeightError(f"{file}: cannot read tensor {name} ({exc}); the file is damaged") from None
                bar.update(tensor.numel() * tensor.element_size())
                yield name, tensor


def check_mtp_weights(path: Path, config: ModelConfig) -> None:
    """Refuse --speculative mtp, with what to do instead, for a checkpoint that carries no MTP module."""
    if config.model_type not in ("deepseek_v3",) and config.architecture != "DeepseekV3ForCausalLM":
        raise ConfigError(f"--speculative mtp needs a DeepSeek-V3-style checkpoint with its multi-token-prediction "
                          f"module; {config.architecture} has none: use --speculative ngram")
    name = f"model.layers.{config.num_hidden_layers}.eh_proj.weight"
    if int(config.get("num_nextn_predict_layers", 0)) < 1 or name not in checkpoint_names(path):
        raise ConfigError(f"this checkpoint has no MTP weights ({name} is missing, num_nextn_predict_layers is "
                          f"{config.get('num_nextn_predict_layers', 0)}): use --speculative ngram, or a checkpoint "
                          "that ships its MTP module (DeepSeek-V3 / R1, the bundled demo model)")


def checkpoint_names(path: Path) -> set[str]:
    """The tensor names of a checkpoint folder (its index, else the files' headers; no tensor is read)."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}))
    names: set[str] = set()
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            names.update(handle.keys())
    return names


_QUANT_BYTES = {"int8": 1.0, "fp8": 1.0, "int4": 0.5}


def check_fits(config: ModelConfig, backend: Backend, device: torch.device, dtype: torch.dtype,
               quant: str | None) -> None:
    """Refuse, before allocating anything, a model whose weights alone exceed the device's whole memory."""
    try:
        total = backend.memory_info(device.index or 0).total_bytes
    except Exception:  # a backend that cannot tell: the allocation itself will say
        return
    bytes_per = _QUANT_BYTES.get(quant or "", torch.empty((), dtype=dtype).element_size())
    need = estimated_parameters(config) * bytes_per
    if total and need > total:
        raise ConfigError(
            f"the model needs about {need / 2**30:,.1f} GiB for its weights ({quant or str(dtype).removeprefix('torch.')})"
            f" but the {device.type} device has {total / 2**30:,.1f} GiB; quantize it (--quant int4), split it over "
            "several devices (--tp, --pp), or check its config.json"
        )


def build_model(
    path: Path | GGUFFile,
    backend: Backend,
    device: torch.device,
    dtype: torch.dtype | None,
    progress: bool = True,
    quant: str | None = None,
    quant_group_size: int | None = None,
    prepare: bool = True,
    kernels: str = "auto",
    mtp: bool = False,
) -> tuple[CausalLM, ModelConfig, torch.dtype]:
    """Read config.json, construct the model on `device` and load its weights (a GGUF file, by path or
    opened as a GGUFFile: shoal.gguf).
    `kernels`: EngineConfig.cpu_kernels, which of the backend's kernels the model's ops and matmuls take.

    `quant` ("int8", "int4", "fp8") stores the weights quantized, each quantized as it streams in; a
    checkpoint that is already quantized (config.json's quantization_config) is read as such. See
    shoal/quant/plan.py. `prepare=False` keeps quantized weights in their canonical layout (for export).
    `mtp`: also build and load the checkpoint's multi-token-prediction module (--speculative mtp).
    """
    if isinstance(path, GGUFFile) or path.is_file():
        if mtp:
            raise ConfigError("--speculative mtp reads the MTP module from a safetensors checkpoint folder, not a "
                              "GGUF file; pass the folder, or use --speculative ngram")
        from shoal.gguf import build_gguf_model

        return build_gguf_model(path, backend, device, dtype, progress, quant, quant_group_size, prepare, kernels)
    from shoal.quant.plan import plan_quantization

    config = load_model_config(path)
    if mtp:
        check_mtp_weights(path, config)
        config.draft_layers = 1
    dtype = choose_dtype(config, backend, dtype)
    check_fits(config, backend, device, dtype, quant)
    plan = plan_quantization(config, backend, quant, quant_group_size, prepare)
    model = construct_model(config, backend, device, dtype, plan, kernels)
    weights = iterate_weights(safetensors_files(path), progress=progress)
    stream = plan.checkpoint.wrap(weights) if plan is not None and plan.checkpoint is not None else weights
    return load_into(model, stream, weights.close, plan), config, dtype
