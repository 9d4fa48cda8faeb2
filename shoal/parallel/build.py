"""Builds this rank's shard of a model: construct it with parameters on the meta device (no memory),
swap layers for their split variants, drop the layers of other pipeline stages, give what remains
real storage, then stream the checkpoint in — each layer cutting its own slice as a tensor arrives.
Model code is unchanged: the split is applied to the model from outside, by layer type.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from shoal.backends.base import Backend
from shoal.backends.ops import bind_ops
from shoal.layers.linear import Linear
from shoal.layers.mlp import GatedMLP
from shoal.layers.moe import MoE
from shoal.construct import _default_dtype, build_on_meta, choose_dtype, materialize
from shoal.loader import iterate_weights, safetensors_files
from shoal.models import CausalLM, model_class
from shoal.models.deepseek import MultiHeadLatentAttention
from shoal.models.hf_config import ModelConfig, load_model_config
from shoal.models.llama import LlamaAttention
from shoal.parallel.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from shoal.parallel.moe import ExpertParallelMoE, PartitionedExperts, TensorParallelExperts, TensorParallelMoE
from shoal.parallel.split import check_expert_split, check_tensor_split, expert_split, layer_split
from shoal.parallel.state import ParallelState
from shoal.quant.plan import QuantPlan, apply_plan, plan_quantization, prepare_for_kernels

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass
class ModelSource:
    """What a rank reads before it builds its shard, once: the config, how the weights are stored, and for
    a GGUF file the opened file (its header parsed once)."""

    path: Path
    config: ModelConfig
    quant: QuantPlan | None
    gguf: object = None  # shoal.gguf.loader.GGUFModel

    @classmethod
    def open(cls, path: Path, backend: Backend, quant: str | None, quant_group_size: int | None) -> "ModelSource":
        from shoal.gguf import is_gguf

        if is_gguf(path):
            from shoal.gguf.loader import gguf_quant_plan, open_gguf_model

            gguf = open_gguf_model(path, backend)
            return cls(path, gguf.config, gguf_quant_plan(gguf, backend, quant, quant_group_size), gguf)
        config = load_model_config(path)
        return cls(path, config, plan_quantization(config, backend, quant, quant_group_size))

    def weights(self, model: CausalLM, dtype: torch.dtype, progress: bool):
        """(stream of (checkpoint name, tensor) pairs for `model`'s shard, the call that ends its progress bar)."""
        if self.gguf is not None:
            from shoal.gguf.loader import gguf_weights

            weights = gguf_weights(self.gguf, model, dtype, progress)
            return weights, weights.close
        weights = iterate_weights(safetensors_files(self.path), progress=progress)
        plan = self.quant
        stream = plan.checkpoint.wrap(weights) if plan is not None and plan.checkpoint is not None else weights
        return stream, weights.close


class AbsentLayer(nn.Module):
    """A decoder layer that lives on another pipeline stage: no weights, never called."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this decoder layer belongs to another pipeline stage")


def plan_splits(config: ModelConfig, state: ParallelState, speeds: list[float] | None = None,
                quant: QuantPlan | None = None) -> None:
    """Fill in the layer and expert splits (same result on every rank) after checking they fit (also
    the quantized weights' groups and blocks, under `quant`)."""
    parallel = state.config
    fmt = quant.fmt if quant is not None else None
    check_tensor_split(config, parallel.tp, fmt, quant.group_size if quant is not None else 0)
    check_expert_split(config, parallel.ep)
    state.layer_sizes = layer_split(config, parallel, speeds)
    experts = config.moe.num_experts if config.moe is not None else 0
    state.expert_sizes = expert_split(experts, parallel, speeds) if parallel.ep > 1 else [experts]


def _split_tensor(model: CausalLM, state: ParallelState) -> None:
    """Swap attention, MLP, MoE, embedding and head layers for their tensor / expert split variants."""
    tp, rank, group = state.tp, state.tp_rank, state.stage_group
    config = model.config
    done: set[str] = set()
    for name, module in list(model.named_modules()):
        if any(name.startswith(prefix + ".") for prefix in done) or isinstance(module, AbsentLayer):
            continue
        if isinstance(module, MoE):
            done.add(name)
            if state.ep > 1:
                first, end = state.expert_range()
                hidden = module.experts.gate_up.shape[-1]
                experts = PartitionedExperts(module.experts.num_experts, first, end - first, hidden,
                                             module.experts.intermediate_size)
                model.set_submodule(name, ExpertParallelMoE(module, experts, state.expert_sizes, state.ep_rank,
                                                            group))
            elif tp > 1:
                hidden = module.experts.gate_up.shape[-1]
                experts = TensorParallelExperts(module.experts.num_experts, hidden,
                                                module.experts.intermediate_size, rank, tp)
                shared = module.shared_experts
                if shared is not None:
                    shared.gate_up_proj = ColumnParallelLinear.from_linear(shared.gate_up_proj, rank, tp)
                    shared.down_proj = RowParallelLinear.from_linear(shared.down_proj, rank, tp, group, reduce=False)
                model.set_submodule(name, TensorParallelMoE(module, experts, shared, group))
            continue
        if tp == 1:
            continue
        if isinstance(module, LlamaAttention):
            module.qkv_proj = ColumnParallelLinear.from_linear(module.qkv_proj, rank, tp)
            module.o_proj = RowParallelLinear.from_linear(module.o_proj, rank, tp, group)
            module.num_heads //= tp
            module.num_kv_heads //= tp
        elif isinstance(module, MultiHeadLatentAttention):
            # The latent (q_a, kv_a) projections are small and replicated; the per-head ones are split.
            for attr in ("q_b_proj", "q_proj", "kv_b_proj"):
                if isinstance(getattr(module, attr, None), Linear):
                    setattr(module, attr, ColumnParallelLinear.from_linear(getattr(module, attr), rank, tp))
            module.o_proj = RowParallelLinear.from_linear(module.o_proj, rank, tp, group)
            module.num_heads //= tp
        elif isinstance(module, GatedMLP):
            module.gate_up_proj = ColumnParallelLinear.from_linear(module.gate_up_proj, rank, tp)
            module.down_proj = RowParallelLinear.from_linear(module.down_proj, rank, tp, group)
    if tp > 1:
        hidden = config.hidden_size
        embed = model.model.embed_tokens
        if embed is not None:
            model.model.embed_tokens = VocabParallelEmbedding(config.vocab_size, hidden, rank, tp, group)
        if model.lm_head is not None:
            tied = model.model.embed_tokens if config.tie_word_embeddings else None
            model.lm_head = ParallelLMHead(config.vocab_size, hidden, rank, tp, group, tied)
        model.tp_size = tp


def _split_pipeline(model: CausalLM, state: ParallelState) -> None:
    first, end = state.layer_range()
    layers = model.model.layers
    for index in range(len(layers)):
        if not first <= index < end:
            layers[index] = AbsentLayer()
    tied = model.config.tie_word_embeddings
    keep_embedding = state.is_first_stage or (tied and state.is_last_stage)
    if not keep_embedding:
        model.model.embed_tokens = None
    if not state.is_last_stage:
        model.model.norm = None
        model.lm_head = None

    def skip(name: str) -> bool:
        match = _LAYER.match(name)
        if match:
            return not first <= int(match.group(1)) < end
        if name.startswith("model.embed_tokens."):
            return not keep_embedding
        if name.startswith(("model.norm.", "lm_head.")):
            return not state.is_last_stage
        return False

    model.skip_weight = skip


def build_model_shard(source: ModelSource, backend: Backend, device: torch.device, dtype: torch.dtype | None,
                      state: ParallelState, progress: bool = True,
                      kernels: str = "auto") -> tuple[CausalLM, ModelConfig, torch.dtype]:
    """This rank's part of the model `source` reads (a folder or a GGUF file), loaded; `state` must have
    its splits planned.

    `source.quant` as for shoal.loader.build_model: the split layers are swapped for their quantized
    variants (shoal/quant/parallel.py) after the split and before any weight is allocated.
    """
    config, plan = source.config, source.quant
    cls = model_class(config)
    dtype = choose_dtype(config, backend, dtype)
    model = build_on_meta(cls, config, backend, dtype)
    with _default_dtype(dtype), torch.device("meta"):  # split layers are shapes too until materialize
        _split_pipeline(model, state)
        _split_tensor(model, state)
    if plan is not None and plan.changes_model:
        apply_plan(model, plan, backend, dtype, device, kernels)
    materialize(model, device)
    bind_ops(model, backend.ops(kernels))
    model.capture_decode = False  # a split step's collectives are not kernels a replay could run
    stream, close = source.weights(model, dtype, progress)
    try:
        model.load_weights(stream)
    finally:
        close()
    if plan is not None and plan.changes_model and plan.prepare:
        prepare_for_kernels(model)
    model.eval()
    return model, config, dtype
