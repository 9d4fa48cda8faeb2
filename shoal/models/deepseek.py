"""The DeepSeek family: V2, V2-Lite, V3 and R1 — Multi-head Latent Attention (MLA) and DeepSeekMoE.

MLA caches one compressed latent per token (kv_lora_rank values, after RMSNorm) plus one shared
rotary key (qk_rope_head_dim values) instead of full per-head keys and values. Prefill expands the
latent into keys and values with kv_b_proj; decode uses the weight-absorbed form, folding kv_b_proj
into the query and the output so attention runs directly over the cached latent.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from shoal.backends.base import Backend, sdpa_attention
from shoal.backends.ops import REFERENCE, Ops
from shoal.errors import ConfigError
from shoal.layers.attention import attend_in_parts
from shoal.layers.embedding import LMHead, VocabEmbedding
from shoal.layers.kv_cache import ContiguousKVCache
from shoal.layers.linear import Linear
from shoal.layers.mlp import GatedMLP
from shoal.layers.moe import MoE, RouterConfig, routed_expert_weight
from shoal.layers.norm import RMSNorm
from shoal.layers.rotary import RotaryEmbedding, yarn_mscale
from shoal.models.base import CausalLM
from shoal.models.hf_config import ModelConfig

_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


def mla_softmax_scale(config: ModelConfig) -> float:
    """1/sqrt(qk_head_dim), times YaRN's mscale(mscale_all_dim)^2 when the context is stretched."""
    head_dim = config.get("qk_nope_head_dim") + config.get("qk_rope_head_dim")
    scale = head_dim**-0.5
    rope = config.rope
    if rope.type == "yarn" and rope.mscale_all_dim:
        m = yarn_mscale(rope.factor, rope.mscale_all_dim)
        scale *= m * m
    return scale


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int, backend: Backend, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.get("q_lora_rank")
        self.kv_lora_rank = config.get("kv_lora_rank")
        self.nope_dim = config.get("qk_nope_head_dim")
        self.rope_dim = config.get("qk_rope_head_dim")
        self.v_dim = config.get("v_head_dim")
        hidden, heads = config.hidden_size, self.num_heads
        q_out = heads * (self.nope_dim + self.rope_dim)
        bias = bool(config.get("attention_bias", False))
        if self.q_lora_rank:
            self.q_a_proj = Linear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = Linear(self.q_lora_rank, q_out)
        else:
            self.q_proj = Linear(hidden, q_out)
        self.kv_a_proj_with_mqa = Linear(hidden, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = Linear(self.kv_lora_rank, heads * (self.nope_dim + self.v_dim))
        self.o_proj = Linear(heads * self.v_dim, hidden, bias=bias)
        self.rotary = rotary
        self.scale = mla_softmax_scale(config)
        self.attention_fn = backend.attention_fn(mla=True, kv_dtype=torch.get_default_dtype())
        # The backend's decode attention (Ops.decode_attention) stands in for the default attention only,
        # never for a backend's own attention_fn.
        self.fusable = self.attention_fn is sdpa_attention

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: ContiguousKVCache) -> torch.Tensor:
        b, t, _ = x.shape
        if self.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        kv = self.kv_a_proj_with_mqa(x)
        out = attend_in_parts(self._attend, cache, positions, q, kv)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.v_dim))

    def _attend(self, cache: ContiguousKVCache, positions: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """The query and kv_a projections [b, t, ...] -> attention output [b, t, heads * v_dim]."""
        b, t, _ = q.shape
        fused = cache.decode_attention() if self.fusable else None
        if fused is not None:
            out = self._fused_decode(fused, q, kv, positions, cache)
            if out is not None:
                return out.view(b, t, self.num_heads * self.v_dim)
        q = q.view(b, t, self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        q_rope = self.rotary(q_rope, positions)
        k_rope = self.rotary(k_rope[:, :, None, :], positions)[:, :, 0]
        (cached,) = cache.write(self.layer_index, positions, torch.cat([latent, k_rope], dim=-1))
        cached = cached.to(q.dtype)  # [sequences, keys, kv_lora_rank + rope_dim]
        q_nope, q_rope = cache.unpack(q_nope), cache.unpack(q_rope)  # one row per sequence
        if q_nope.shape[1] == 1:
            out = self._attend_absorbed(q_nope, q_rope, cached, cache.attention_mask())
        else:
            out = self._attend_expanded(q_nope, q_rope, cached, cache.attention_mask())
        out = cache.pack(out.flatten(2))  # back to the step's layout
        return out.reshape(b, t, self.num_heads * self.v_dim)

    def _fused_decode(self, fused, q, kv, positions, cache) -> torch.Tensor | None:
        """One new token per sequence on the CPU: the latent's norm, rotary, the cache write, the
        absorption and attention in one kernel call (the backend's Ops.decode_attention, `.mla`), or None where it
        does not apply (another dtype somewhere, a quantized or sharded-away kv_b_proj weight)."""
        weight = getattr(self.kv_b_proj, "weight", None)
        norm = self.kv_a_layernorm.weight
        dtype = fused.dtype
        if (fused.window or q.dtype != dtype or kv.dtype != dtype or not isinstance(weight, torch.Tensor)
                or weight.dtype != dtype or norm.dtype != dtype or not weight.is_contiguous()
                or weight.numel() != self.num_heads * (self.nope_dim + self.v_dim) * self.kv_lora_rank):
            return None
        (pool,) = cache.pools(self.layer_index)
        if pool.dtype != dtype or not pool.is_contiguous():
            return None
        rows_q, rows_kv = q.reshape(-1, q.shape[-1]), kv.reshape(-1, kv.shape[-1])
        if rows_q.stride(-1) != 1 or rows_kv.stride(-1) != 1:
            return None
        cos_sin = self.rotary.tables(fused.position_end)
        return fused.mla(
            rows_q, rows_kv, norm, self.kv_a_layernorm.eps, weight, self.num_heads, self.nope_dim, self.rope_dim,
            self.kv_lora_rank, self.v_dim, pool, self.scale, cos_sin, self.rotary.interleaved,
        )

    def _kv_b_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]  # W_UK [h, nope, rank], W_UV [h, v, rank]

    def _attend_expanded(self, q_nope, q_rope, cached, mask) -> torch.Tensor:
        """Prefill: rebuild per-head keys and values from the latent, then ordinary attention."""
        b, n = cached.shape[:2]
        latent, k_rope = cached.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(latent).view(b, n, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope[:, :, None, :].expand(b, n, self.num_heads, self.rope_dim)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        out = self.attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, self.scale)
        return out.transpose(1, 2)  # [b, t, heads, v_dim]

    def _attend_absorbed(self, q_nope, q_rope, cached, mask) -> torch.Tensor:
        """Decode: q·k = (q_nope W_UK)·latent + q_rope·k_rope, so attend over the latent as one shared KV head."""
        w_uk, w_uv = self._kv_b_weight()
        q_latent = torch.einsum("bthd,hdr->bhtr", q_nope, w_uk)
        q = torch.cat([q_latent, q_rope.transpose(1, 2)], dim=-1)  # [b, heads, t, rank + rope]
        keys = cached[:, None]  # [b, 1, keys, rank + rope]
        values = cached[:, None, :, : self.kv_lora_rank]
        if self.fusable:
            # torch's SDPA: all heads' queries as rows of one head, so no kernel expands the latent per head
            # (the CPU's math fallback would copy it 16 times for grouped-query attention)
            b, h, t = q.shape[:3]
            if mask is not None:
                mask = mask.expand(b, h, t, mask.shape[-1]).reshape(b, 1, h * t, mask.shape[-1])
            out_latent = self.attention_fn(q.reshape(b, 1, h * t, -1), keys, values, mask, self.scale)
            out_latent = out_latent.view(b, h, t, self.kv_lora_rank)
        else:
            out_latent = self.attention_fn(q, keys, values, mask, self.scale)  # [b, heads, t, rank]
        return torch.einsum("bhtr,hvr->bthv", out_latent, w_uv)


class DeepseekDecoderLayer(nn.Module):
    ops: Ops = REFERENCE  # the backend's, once the model is built (its residual add)

    def __init__(self, config: ModelConfig, layer_index: int, backend: Backend, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = MultiHeadLatentAttention(config, layer_index, backend, rotary)
        if is_moe_layer(config, layer_index):
            moe = config.moe
            self.mlp = MoE(config.hidden_size, moe.intermediate_size, router_config(config), moe.shared_intermediate_size)
        else:
            self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: ContiguousKVCache) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), positions, cache)
        h, x = self.post_attention_layernorm(h, residual=x)  # x + attention, and its norm, in one pass
        return self.ops.add(x, self.mlp(h))


def is_moe_layer(config: ModelConfig, index: int) -> bool:
    """Whether layer `index` holds the MoE block (DeepSeek: dense for the first `first_k_dense_replace`
    layers, then MoE every `moe_layer_freq`; see hf_config.parse_moe)."""
    if config.moe is None:
        return False
    # The MTP module (index num_hidden_layers) has the block of the layers past first_k_dense_replace, as
    # transformers' DeepseekV3DecoderLayer builds it: that of the last decoder layer.
    return config.moe.layers[min(index, len(config.moe.layers) - 1)]


def router_config(config: ModelConfig) -> RouterConfig:
    v3 = config.architecture == "DeepseekV3ForCausalLM" or config.model_type == "deepseek_v3"
    scoring = config.get("scoring_func", "sigmoid" if v3 else "softmax")
    topk_method = config.get("topk_method", "noaux_tc" if v3 else "greedy")
    return RouterConfig(
        num_experts=config.moe.num_experts,
        top_k=config.moe.experts_per_token,
        scoring=scoring,
        topk_method=topk_method,
        num_groups=int(config.get("n_group", 1)),
        topk_groups=int(config.get("topk_group", 1)),
        norm_topk_prob=bool(config.get("norm_topk_prob", False)),
        routed_scaling_factor=float(config.get("routed_scaling_factor", 1.0)),
        correction_bias=topk_method == "noaux_tc",
    )


class MultiTokenPredictor(DeepseekDecoderLayer):
    """DeepSeek-V3's multi-token-prediction (MTP) module, checkpoint layer `num_hidden_layers`: from the
    target's final hidden state at position p and the embedding of token p + 1 it predicts token p + 2.
    As vLLM's DeepSeekMultiTokenPredictorLayer: eh_proj([enorm(embedding); hnorm(hidden)]), one decoder
    block (its own KV cache layer), then shared_head.norm and the main output head. The checkpoint's copies
    of the embedding and head in that layer (`embed_tokens`, `shared_head.head`) equal the main model's and
    are not loaded twice."""

    def __init__(self, config: ModelConfig, layer_index: int, backend: Backend, rotary: RotaryEmbedding) -> None:
        super().__init__(config, layer_index, backend, rotary)
        hidden = config.hidden_size
        self.enorm = RMSNorm(hidden, config.rms_norm_eps)
        self.hnorm = RMSNorm(hidden, config.rms_norm_eps)
        self.eh_proj = Linear(2 * hidden, hidden)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(hidden, config.rms_norm_eps)

    def inputs(self, embedded: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Embeddings of tokens p + 1 and hidden states at p, [batch, tokens, hidden] -> the block's input
        before eh_proj: [enorm(embedding); hnorm(hidden)]."""
        return torch.cat([self.enorm(embedded), self.hnorm(hidden)], dim=-1)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: ContiguousKVCache) -> torch.Tensor:
        """inputs() -> the module's output (eh_proj, then the decoder block)."""
        return super().forward(self.eh_proj(x), positions, cache)


class DeepseekModel(nn.Module):
    def __init__(self, config: ModelConfig, backend: Backend) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        rotary = RotaryEmbedding(
            config.rope,
            config.get("qk_rope_head_dim"),
            config.max_position_embeddings,
            interleaved=bool(config.get("rope_interleave", True)),
        )
        self.layers = nn.ModuleList(
            DeepseekDecoderLayer(config, i, backend, rotary) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DeepseekForCausalLM(CausalLM):
    """DeepseekV2ForCausalLM and DeepseekV3ForCausalLM; the routing differences live in RouterConfig."""

    merged_weights = (
        (".gate_proj.", ".gate_up_proj.", "gate_proj"),
        (".up_proj.", ".gate_up_proj.", "up_proj"),
    )

    def __init__(self, config: ModelConfig, backend: Backend) -> None:
        super().__init__(config)
        for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if not config.get(key):
                raise ConfigError(f"config.json of a DeepSeek model needs {key!r} (Multi-head Latent Attention sizes)")
        self.model = DeepseekModel(config, backend)
        self.lm_head = LMHead(
            config.vocab_size, config.hidden_size, self.model.embed_tokens if config.tie_word_embeddings else None
        )
        # The MTP draft (speculative decoding, shoal.engine.speculative.MtpDraft), built only when asked for.
        self.mtp = None
        if config.draft_layers:
            self.mtp = MultiTokenPredictor(config, config.num_hidden_layers, backend,
                                           self.model.layers[0].self_attn.rotary)

    def mtp_forward(self, token_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                    cache: ContiguousKVCache) -> torch.Tensor:
        """The MTP module at `positions` over tokens p + 1 and the hidden states at p -> its output states."""
        cache.begin_forward(positions, self.sliding_window)
        x = self.mtp.inputs(self.model.embed_tokens(token_ids), hidden)
        # One token per row (MtpDraft lays its rows out so): recorded and replayed as the target's decode
        # steps are, in graphs of the module's own.
        return self.decode_step("_mtp_graphs", cache, x, lambda h: self.mtp(h, positions, cache))

    _mtp_graphs = None

    def mtp_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The MTP module's output -> logits for the token after next (the shared head)."""
        return self.lm_head(self.mtp.shared_head.norm(hidden))

    def _mtp_prefix(self) -> str | None:
        return f"model.layers.{self.config.num_hidden_layers}." if self.mtp is not None else None

    def canonical_name(self, name: str) -> str:
        prefix = self._mtp_prefix()
        if prefix and name.startswith(prefix):
            return "mtp." + name[len(prefix):]
        return super().canonical_name(name)

    def checkpoint_spelling(self, name: str) -> str:
        prefix = self._mtp_prefix()
        if prefix and name.startswith("mtp."):
            return prefix + name[len("mtp."):]
        return super().checkpoint_spelling(name)

    def cache_entry_shapes(self) -> list[tuple[int, ...]]:
        return [(self.config.get("kv_lora_rank") + self.config.get("qk_rope_head_dim"),)]

    def ignore_weight(self, name: str) -> bool:
        # DeepSeek-V3 ships its multi-token-prediction module as extra layers past num_hidden_layers.
        match = _LAYER_INDEX.match(name)
        if match and int(match.group(1)) >= self.config.num_hidden_layers:
            if self.mtp is None or int(match.group(1)) > self.config.num_hidden_layers:
                return True
            rest = name[match.end():]
            return rest.startswith(("embed_tokens.", "shared_head.head."))  # copies of the main model's
        return super().ignore_weight(name)

    def expert_weight(self, name: str) -> tuple[str, int, str] | None:
        return routed_expert_weight(name)
