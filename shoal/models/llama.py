"""The Llama family: Llama 2/3, Qwen2 (q/k/v bias), Qwen3 (per-head q/k RMSNorm), Mistral (sliding window),
and their mixture-of-experts kin: Qwen3-MoE, Qwen2-MoE (a shared expert behind a sigmoid gate), Mixtral.

Pre-norm decoder with grouped-query attention, rotary positions and a SwiGLU MLP — or, in the MoE
families' sparse layers, the shared MoE block (layers/moe.py) in its place; one class covers them all,
switched by config fields, so a split or a weight format applied to it covers them all.
"""

from __future__ import annotations

import torch
from torch import nn

from shoal.backends.base import Backend, sdpa_attention
from shoal.backends.ops import REFERENCE, Ops
from shoal.layers.attention import CachedAttention, attend_in_parts
from shoal.layers.embedding import LMHead, VocabEmbedding
from shoal.layers.kv_cache import ContiguousKVCache
from shoal.layers.linear import Linear, MergedLinear
from shoal.layers.mlp import GatedMLP
from shoal.layers.moe import MoE, RouterConfig, routed_expert_weight
from shoal.layers.norm import RMSNorm
from shoal.layers.rotary import RotaryEmbedding
from shoal.models.base import CausalLM
from shoal.models.hf_config import ModelConfig


class LlamaAttention(nn.Module):
    def __init__(
        self, config: ModelConfig, layer_index: int, backend: Backend, rotary: RotaryEmbedding, qkv_bias: bool, o_bias: bool
    ):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(
            config.hidden_size, [q_size, kv_size, kv_size], ("q_proj", "k_proj", "v_proj"), bias=qkv_bias
        )
        self.o_proj = Linear(q_size, config.hidden_size, bias=o_bias)
        self.qk_norm = config.model_type in ("qwen3", "qwen3_moe") or config.architecture in QK_NORM_ARCHITECTURES
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.rotary = rotary  # shared by all layers: one cos/sin table
        attention_fn = backend.attention_fn(mla=False, kv_dtype=torch.get_default_dtype())
        self.attn = CachedAttention(layer_index, self.head_dim**-0.5, attention_fn)
        # The backend's decode attention (Ops.decode_attention) stands in for the default attention only,
        # never for a backend's own attention_fn.
        self.fusable = attention_fn is sdpa_attention

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: ContiguousKVCache) -> torch.Tensor:
        return self.o_proj(attend_in_parts(self._attend, cache, positions, self.qkv_proj(x)))

    def _attend(self, cache: ContiguousKVCache, positions: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        """The merged q / k / v projection [b, t, ...] -> attention output [b, t, heads * head_dim]."""
        b, t, _ = qkv.shape
        fused = cache.decode_attention() if self.fusable else None
        if fused is not None and qkv.dtype == fused.dtype:
            return self._fused_decode(fused, qkv, positions, cache).view(b, t, -1)
        q, k, v = self.qkv_proj.split(qkv)
        v = v.view(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = self.q_norm(q.view(b, t, self.num_heads, self.head_dim))
            k = self.k_norm(k.view(b, t, self.num_kv_heads, self.head_dim))
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        else:
            # q and k sit side by side in the merged output: rotate them as one tensor (half the small ops).
            heads = self.num_heads + self.num_kv_heads
            qk = self.rotary(qkv[..., : heads * self.head_dim].view(b, t, heads, self.head_dim), positions)
            q, k = qk[:, :, : self.num_heads], qk[:, :, self.num_heads :]
        return self.attn(q, k, v, positions, cache)

    def _fused_decode(self, fused, qkv: torch.Tensor, positions: torch.Tensor, cache: ContiguousKVCache) -> torch.Tensor:
        """One new token per sequence on the CPU: rotary, the cache write and attention in one kernel call
        (the backend's Ops.decode_attention) over the rows of the merged q / k / v output."""
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        rows = qkv.view(-1, qkv.shape[-1])
        q_end, k_end = heads * dim, (heads + kv_heads) * dim
        q, k, v = rows[:, :q_end], rows[:, q_end:k_end], rows[:, k_end : k_end + kv_heads * dim]
        if self.qk_norm:  # per-head norms first (Qwen3); the kernel then rotates, writes and attends
            q, k = self.q_norm.heads(q, heads), self.k_norm.heads(k, kv_heads)
        cos_sin = self.rotary.tables(fused.position_end)
        k_pool, v_pool = cache.pools(self.attn.layer_index)
        return fused(q, k, v, heads, kv_heads, dim, k_pool, v_pool, self.attn.scale, cos_sin)


class LlamaDecoderLayer(nn.Module):
    ops: Ops = REFERENCE  # the backend's, once the model is built (its residual add)

    def __init__(
        self, config: ModelConfig, layer_index: int, backend: Backend, rotary: RotaryEmbedding, qkv_bias: bool, o_bias: bool
    ):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_index, backend, rotary, qkv_bias, o_bias)
        self.mlp = feed_forward(config, layer_index)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: ContiguousKVCache) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), positions, cache)
        h, x = self.post_attention_layernorm(h, residual=x)  # x + attention, and its norm, in one pass
        return self.ops.add(x, self.mlp(h))


QK_NORM_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
QKV_BIAS_ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")


def feed_forward(config: ModelConfig, layer_index: int) -> nn.Module:
    """Layer `layer_index`'s MLP: the SwiGLU block, or the MoE block where config.json makes the layer
    sparse (hf_config.parse_moe: Qwen-MoE's decoder_sparse_step / mlp_only_layers, Mixtral's every layer)."""
    moe = config.moe
    if moe is None or not moe.layers[layer_index]:
        return GatedMLP(config.hidden_size, config.intermediate_size, bias=bool(config.get("mlp_bias", False)))
    # Qwen-MoE and Mixtral: softmax over all experts, top-k, renormalised (Mixtral always, Qwen by norm_topk_prob).
    mixtral = config.model_type == "mixtral" or config.architecture == "MixtralForCausalLM"
    router = RouterConfig(moe.num_experts, moe.experts_per_token,
                          norm_topk_prob=mixtral or bool(config.get("norm_topk_prob", False)))
    return MoE(config.hidden_size, moe.intermediate_size, router, moe.shared_intermediate_size,
               shared_gate=moe.shared_intermediate_size > 0)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, backend: Backend, qkv_bias: bool, o_bias: bool):
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        rotary = RotaryEmbedding(config.rope, config.head_dim, config.max_position_embeddings)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, backend, rotary, qkv_bias, o_bias) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(CausalLM):
    merged_weights = (
        (".q_proj.", ".qkv_proj.", "q_proj"),
        (".k_proj.", ".qkv_proj.", "k_proj"),
        (".v_proj.", ".qkv_proj.", "v_proj"),
        (".gate_proj.", ".gate_up_proj.", "gate_proj"),
        (".up_proj.", ".gate_up_proj.", "up_proj"),
    )

    def __init__(self, config: ModelConfig, backend: Backend) -> None:
        super().__init__(config)
        qwen2 = config.architecture in QKV_BIAS_ARCHITECTURES or config.model_type in ("qwen2", "qwen2_moe")
        attention_bias = bool(config.get("attention_bias", False))
        # Qwen2 has q/k/v biases (Qwen2-MoE unless qkv_bias says not) and never an o_proj bias; Llama, Qwen3
        # and Mixtral use `attention_bias` for all four.
        qkv_bias, o_bias = (bool(config.get("qkv_bias", True)), False) if qwen2 else (attention_bias, attention_bias)
        self.model = LlamaModel(config, backend, qkv_bias, o_bias)
        self.lm_head = LMHead(
            config.vocab_size, config.hidden_size, self.model.embed_tokens if config.tie_word_embeddings else None
        )
        uses_window = config.model_type in ("mistral", "mixtral") or bool(config.get("use_sliding_window", False))
        self.sliding_window = config.get("sliding_window") if uses_window else None

    def cache_entry_shapes(self) -> list[tuple[int, ...]]:
        shape = (self.config.num_key_value_heads // self.tp_size, self.config.head_dim)
        return [shape, shape]

    def expert_weight(self, name: str) -> tuple[str, int, str] | None:
        return routed_expert_weight(name)


class MixtralForCausalLM(LlamaForCausalLM):
    """Mistral with a MoE block in every layer; only its checkpoint names differ (block_sparse_moe, and the
    experts' w1 / w3 / w2 for gate / up / down)."""

    checkpoint_renames = (
        (".block_sparse_moe.", ".mlp."),
        (".w1.", ".gate_proj."),
        (".w3.", ".up_proj."),
        (".w2.", ".down_proj."),
    )


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    """Qwen2 with MoE blocks; its one shared expert is checkpointed as `shared_expert` (DeepSeek's plural
    `shared_experts` in the shared MoE layer)."""

    checkpoint_renames = ((".shared_expert.", ".shared_experts."),)
