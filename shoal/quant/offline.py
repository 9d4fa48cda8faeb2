"""`shoal quantize`: write a quantized copy of a checkpoint that shoal (and, for int4 / int8, vLLM) loads
directly.

The model is loaded once with quantize-on-load (weights in their canonical layout), then the source
files are streamed again: each tensor that went into a quantized layer is replaced by that layer's
quantized weight, everything else is copied as it is (fp8 tensors of layers that stay dense are
dequantized to the checkpoint's dtype). So loading the written checkpoint gives exactly the model
that quantizing at load gives.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from shoal.backends import get_backend
from shoal.errors import ConfigError
from shoal.loader import build_model, iterate_weights, resolve_model_path, safetensors_files
from shoal.quant.checkpoint import encode, quantization_config
from shoal.quant.formats import is_quantized
from shoal.quant.layers import QuantizedLinear, QuantizedStackedExperts
from shoal.quant.plan import check_quant_options

SHARD_BYTES = 2 << 30


def quantize_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    quant: str,
    group_size: int | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> Path:
    """Write `model_dir` quantized to `out_dir`; returns the output folder."""
    check_quant_options(quant, group_size)
    if quant is None:
        raise ConfigError("shoal quantize needs --quant int8, int4 or fp8")
    src = resolve_model_path(model_dir)
    out = Path(out_dir).expanduser()
    if out.resolve() == src.resolve():
        raise ConfigError("--out must be a different folder from --model")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose a new folder for --out")
    backend = get_backend("cpu")
    model, config, dtype = build_model(
        src, backend, torch.device("cpu"), dtype, progress=progress, quant=quant,
        quant_group_size=group_size, prepare=False,
    )
    modules = dict(model.named_modules())
    head = getattr(model, "lm_head", None)  # quantized at load, written as it came (see plan.py)
    from shoal.quant.plan import plan_quantization

    plan = plan_quantization(config, backend, quant, group_size)
    dense_dtype = config.checkpoint_dtype or dtype
    out.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out)
    ignore: list[str] = []
    weights = iterate_weights(safetensors_files(src), progress=progress)
    stream = plan.checkpoint.wrap(weights) if plan.checkpoint is not None else weights
    try:
        for name, value in stream:
            module_name, attr, shard, expert = model.weight_destination(name)
            module = modules.get(module_name) if not model.ignore_weight(name) else None
            prefix = name.rpartition(".")[0]
            if isinstance(module, QuantizedStackedExperts):
                writer.add(encode(module.export(expert, shard), prefix))
            elif isinstance(module, QuantizedLinear) and attr == "weight" and module is not head:
                writer.add(encode(module.export(shard), prefix))
            else:
                tensor = value.dequantize(dense_dtype) if is_quantized(value) else value
                if name.endswith(".weight") and tensor.dim() == 2 and "embed_tokens" not in name:
                    ignore.append(prefix)  # a matrix that stays dense: other loaders must not expect it packed
                writer.add({name: tensor})
    finally:
        weights.close()
    writer.finish()
    raw = dict(config.raw)
    raw["quantization_config"] = quantization_config(quant, plan.group_size, ignore)
    if "torch_dtype" not in raw and "dtype" not in raw:
        raw["torch_dtype"] = str(dense_dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    for file in src.iterdir():
        if file.is_file() and file.suffix not in (".safetensors", ".bin", ".pt") and file.name not in (
            "config.json", "model.safetensors.index.json",
        ):
            shutil.copy2(file, out / file.name)
    return out


class _ShardWriter:
    """Collects tensors and writes safetensors shards of about SHARD_BYTES, plus an index when there are several."""

    def __init__(self, out: Path) -> None:
        self.out, self.pending, self.pending_bytes, self.parts = out, {}, 0, []

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            self.pending[name] = tensor.contiguous()
            self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= SHARD_BYTES:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        path = self.out / f"part-{len(self.parts):05d}.safetensors.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.parts.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        self._flush()
        if len(self.parts) == 1:
            self.parts[0][0].rename(self.out / "model.safetensors")
            return
        weight_map = {}
        for i, (path, names) in enumerate(self.parts):
            final = f"model-{i + 1:05d}-of-{len(self.parts):05d}.safetensors"
            path.rename(self.out / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {}, "weight_map": weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
