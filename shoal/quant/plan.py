"""Decides how a model's weights are stored (from `--quant`, the checkpoint's own format and what the
device can multiply) and swaps the layers of a freshly built model for quantized ones before its
weights stream in.

What is quantized: every Linear and MergedLinear of the decoder layers and the routed experts, in the
chosen format; under int8 and int4 also the embedding table and the output head, int8 per row (the
head is the widest matmul of a decode step; with tied embeddings both share one int8 table). What is
not: norms, the MoE router (routing runs in float32), Qwen2-MoE's one-row shared-expert gate, and
DeepSeek MLA's kv_b_proj, whose matrix the absorbed decode reads directly — a quantized checkpoint's
kv_b_proj is dequantized once at load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from shoal.backends.base import Backend
from shoal.errors import ConfigError
from shoal.layers.embedding import LMHead, VocabEmbedding
from shoal.layers.linear import Linear, MergedLinear
from shoal.layers.moe import StackedExperts
from shoal.models.hf_config import ModelConfig
from shoal.quant.checkpoint import CheckpointFormat, checkpoint_format
from shoal.quant.formats import INT4_GROUP_SIZES, _check_group
from shoal.quant.layers import QuantizedEmbedding, QuantizedLinear, QuantizedStackedExperts, TiedQuantizedHead

from shoal.quant import QUANT_METHODS
DEFAULT_GROUP_SIZE = 64
# Linear layers kept in the compute dtype (module name suffixes).
DENSE_LINEARS = ("kv_b_proj", "shared_expert_gate")  # MLA's absorbed matrix; Qwen2-MoE's one-row gate


def check_quant_options(quant: str | None, group_size: int | None) -> None:
    """Reject a bad --quant / --group-size with a message that says what is accepted."""
    if quant is not None and quant not in QUANT_METHODS:
        raise ConfigError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANT_METHODS)} (or leave it out)")
    if group_size is not None and group_size not in INT4_GROUP_SIZES:
        raise ConfigError(
            f"--group-size must be one of {', '.join(map(str, INT4_GROUP_SIZES))} (inputs per int4 scale), got {group_size}"
        )


@dataclass
class QuantPlan:
    fmt: str | None  # format of the linear layers and experts; None keeps them dense
    group_size: int  # int4 inputs per scale
    quantize_embeddings: bool  # int8 embedding table and output head
    checkpoint: CheckpointFormat | None  # how the files store their weights (None: plain tensors)
    prepare: bool = True  # re-lay weights for the device's kernels (False to export them afterwards)
    keep_dense: frozenset[str] = frozenset()  # modules left unquantized (a GGUF file's non-4-bit layers)

    @property
    def changes_model(self) -> bool:
        return self.fmt is not None or self.quantize_embeddings

    def describe(self) -> str:
        if self.fmt is None:
            return "dense"
        return f"int4 (group {self.group_size})" if self.fmt == "int4" else self.fmt


def plan_quantization(
    config: ModelConfig, backend: Backend, quant: str | None, group_size: int | None = None, prepare: bool = True
) -> QuantPlan | None:
    """The plan for this checkpoint on this device, or None when nothing is quantized at all."""
    check_quant_options(quant, group_size)
    stored = checkpoint_format(config.raw.get("quantization_config"))
    if quant is None and stored is not None:
        if stored.kind == "fp8":
            # Keep fp8 only where the device multiplies in it; elsewhere it becomes the compute dtype at load.
            quant = "fp8" if backend.supports_fp8_matmul() else None
        else:
            quant = stored.kind
            group_size = group_size or stored.group_size
    if quant is None and stored is None:
        return None
    group = group_size or DEFAULT_GROUP_SIZE
    return QuantPlan(quant, group, quant in ("int8", "int4"), stored, prepare)


def apply_plan(model: nn.Module, plan: QuantPlan, backend: Backend, dtype: torch.dtype, device,
               kernels: str = "auto") -> None:
    """Swap the layers of a model built on the meta device (shoal.construct.build_on_meta) for quantized
    ones allocated on `device`; shoal.construct.materialize gives the rest storage afterwards.
    `kernels`: EngineConfig.cpu_kernels, passed to the backend's linear_fn."""
    from shoal.quant.parallel import quantized_parallel

    def linear_fn(fmt: str):
        # the default choice as a one-argument call: a plugin's linear_fn(weight_format) keeps working
        return backend.linear_fn(fmt) if kernels == "auto" else backend.linear_fn(fmt, kernels)

    kernel = linear_fn(plan.fmt) if plan.fmt else None
    int8_kernel = linear_fn("int8") if plan.quantize_embeddings else None
    replaced: dict[int, nn.Module] = {}
    for name, module in list(model.named_modules()):
        new = None
        if name.endswith(DENSE_LINEARS) or name in plan.keep_dense:
            pass
        elif (new := quantized_parallel(module, name, plan, kernel, int8_kernel, dtype, device, replaced)) is not None:
            pass  # a layer of a split model (shoal/parallel), swapped for its quantized split variant
        elif plan.fmt and isinstance(module, Linear):
            if plan.fmt == "int4":
                _check_group(module.in_features, plan.group_size, name)
            merged = isinstance(module, MergedLinear)
            new = QuantizedLinear(
                plan.fmt,
                module.in_features,
                module.out_sizes if merged else [module.out_features],
                module.shard_names if merged else None,
                module.bias is not None,
                kernel,
                plan.group_size,
                dtype,
                device,
            )
        elif plan.fmt and isinstance(module, StackedExperts):
            hidden = module.gate_up.shape[-1]
            if plan.fmt == "int4":
                _check_group(hidden, plan.group_size, f"{name} (gate/up)")
                _check_group(module.intermediate_size, plan.group_size, f"{name} (down)")
            new = QuantizedStackedExperts(
                plan.fmt, module.num_experts, hidden, module.intermediate_size, kernel, plan.group_size, dtype, device
            )
        elif plan.quantize_embeddings and isinstance(module, VocabEmbedding):
            vocab, hidden = module.weight.shape
            new = QuantizedEmbedding(vocab, hidden, int8_kernel, dtype, device)
        elif plan.quantize_embeddings and isinstance(module, LMHead):
            if module.tied_to is not None:
                new = TiedQuantizedHead(replaced[id(module.tied_to)])
            else:
                vocab, hidden = module.weight.shape
                new = QuantizedLinear("int8", hidden, [vocab], None, False, int8_kernel, 0, dtype, device)
        if new is not None:
            replaced[id(module)] = new
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    # LMHead with tied_to keeps a reference to the embedding module: re-point it if that was replaced.
    for module in model.modules():
        if isinstance(module, LMHead) and module.tied_to is not None and id(module.tied_to) in replaced:
            module.tied_to = replaced[id(module.tied_to)]


def prepare_for_kernels(model: nn.Module) -> None:
    """After loading: let each quantized layer re-lay its weight for the device's kernel."""
    for module in model.modules():
        if isinstance(module, (QuantizedLinear, QuantizedStackedExperts)):
            module.prepare()
