"""Model shapes for the planner: parameters, bytes per weight, KV bytes per token, FLOPs and bytes per token.

Everything is read from a config.json through `shoal.models.hf_config` — no weights are needed. The
cost model (cost.py) asks this module for per-layer, per-component figures so that it can place each
piece on the chips of a layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shoal.errors import ConfigError
from shoal.models import model_class
from shoal.models.hf_config import ModelConfig, load_model_config

# Bytes per stored weight of a quantized linear layer, scales included:
# fp8 with 128x128 blocks carries one fp32 scale per block; int8 one scale per output channel
# (negligible); int4 one bf16 scale per group of 128 inputs.
WEIGHT_BYTES = {
    "fp32": 4.0,  # a model run in float32 (a CPU without bf16 arithmetic computes in it)
    "bf16": 2.0,
    "fp16": 2.0,
    "fp8": 1.0 + 4.0 / (128 * 128),
    "int8": 1.0,
    "int4": 0.5 + 2.0 / 128,
    "fp4": 0.5 + 1.0 / 16,  # NVFP4: an fp8 scale per 16 values
}
# Formats whose matmuls run on the chip's low-precision units when the chip has them.
LOW_PRECISION_COMPUTE = {"fp8": "fp8", "int8": "int8", "fp4": "fp4"}
KV_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0}
# Embeddings, the LM head and the router stay in bf16 in every quantized format (as DeepSeek's fp8
# checkpoints do); in a float32 model they are float32 too.
UNQUANTIZED_BYTES = 2.0


def unquantized_bytes(quant: str) -> float:
    """Bytes per weight of the layers no format quantizes (embeddings, LM head, router)."""
    return max(UNQUANTIZED_BYTES, weight_bytes(quant))


def weight_bytes(quant: str) -> float:
    """Bytes per weight of a quantized linear layer in format `quant`."""
    if quant not in WEIGHT_BYTES:
        raise ConfigError(f"unknown quantization {quant!r}; use one of {', '.join(WEIGHT_BYTES)}")
    return WEIGHT_BYTES[quant]


def kv_bytes(kv_dtype: str) -> float:
    if kv_dtype not in KV_BYTES:
        raise ConfigError(f"unknown KV cache dtype {kv_dtype!r}; use one of {', '.join(KV_BYTES)}")
    return KV_BYTES[kv_dtype]


@dataclass
class ModelShape:
    """What the planner needs to know about one model, all counts in elements (parameters, values)."""

    name: str
    architecture: str
    layers: int
    hidden: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    mla: bool
    # MLA dimensions (0 for grouped-query attention)
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_dim: int
    qk_rope_dim: int
    v_head_dim: int
    # feed-forward
    intermediate: int
    dense_layers: int
    moe_layers: int
    routed_experts: int
    shared_experts: int
    experts_per_token: int
    moe_intermediate: int
    mtp_layers: int
    tied_embeddings: bool

    # ---- parameters ---------------------------------------------------------------------------

    @property
    def attention_params(self) -> int:
        """Projection weights of one attention layer."""
        h = self.hidden
        if not self.mla:
            q = self.heads * self.head_dim
            kv = self.kv_heads * self.head_dim
            return h * q + 2 * h * kv + q * h
        qk_dim = self.qk_nope_dim + self.qk_rope_dim
        if self.q_lora_rank:
            q = h * self.q_lora_rank + self.q_lora_rank * self.heads * qk_dim
        else:
            q = h * self.heads * qk_dim
        kv_a = h * (self.kv_lora_rank + self.qk_rope_dim)
        kv_b = self.kv_lora_rank * self.heads * (self.qk_nope_dim + self.v_head_dim)
        out = self.heads * self.v_head_dim * h
        return q + kv_a + kv_b + out

    @property
    def dense_mlp_params(self) -> int:
        return 3 * self.hidden * self.intermediate

    @property
    def expert_params(self) -> int:
        """One routed (or shared) expert: gate, up and down projections."""
        return 3 * self.hidden * self.moe_intermediate

    @property
    def router_params(self) -> int:
        return self.hidden * self.routed_experts if self.moe_layers else 0

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        """The LM head's weights (shared with the embedding when tied, but its matmul still runs)."""
        return self.vocab * self.hidden

    @property
    def moe_layer_params(self) -> int:
        return (self.routed_experts + self.shared_experts) * self.expert_params + self.router_params

    @property
    def total_params(self) -> int:
        """Every stored weight of the main model (multi-token-prediction layers excluded, as model cards count)."""
        embeddings = self.embedding_params * (1 if self.tied_embeddings else 2)
        return (embeddings + self.layers * self.attention_params + self.dense_layers * self.dense_mlp_params
                + self.moe_layers * self.moe_layer_params)

    @property
    def active_params(self) -> int:
        """Weights one token touches in the main model."""
        embeddings = self.embedding_params * (1 if self.tied_embeddings else 2)
        routed = self.moe_layers * (
            (self.experts_per_token + self.shared_experts) * self.expert_params + self.router_params)
        return embeddings + self.layers * self.attention_params + self.dense_layers * self.dense_mlp_params + routed

    @property
    def mtp_params(self) -> int:
        """One multi-token-prediction module: a decoder layer (MoE when the model has experts) plus its
        2h→h projection; it shares the embedding and head."""
        if not self.mtp_layers:
            return 0
        ffn = self.moe_layer_params if self.moe_layers else self.dense_mlp_params
        return self.mtp_layers * (self.attention_params + ffn + 2 * self.hidden * self.hidden)

    def weight_bytes_total(self, quant: str) -> float:
        """Bytes of the main model's weights with linear layers in `quant` and embeddings, head and router in bf16."""
        b = weight_bytes(quant)
        embeddings = self.embedding_params * (1 if self.tied_embeddings else 2)
        linear = self.total_params - embeddings - self.moe_layers * self.router_params
        return linear * b + (embeddings + self.moe_layers * self.router_params) * unquantized_bytes(quant)

    # ---- KV cache -----------------------------------------------------------------------------

    @property
    def kv_values_per_token_layer(self) -> int:
        """Values cached per token per layer: MLA's compressed latent plus its rope key, or GQA's keys and values."""
        if self.mla:
            return self.kv_lora_rank + self.qk_rope_dim
        return 2 * self.kv_heads * self.head_dim

    def kv_bytes_per_token(self, kv_dtype: str = "bf16") -> float:
        """KV cache bytes one token occupies across all layers."""
        return self.layers * self.kv_values_per_token_layer * kv_bytes(kv_dtype)

    # ---- FLOPs --------------------------------------------------------------------------------

    def attention_core_flops_per_key(self, absorbed: bool) -> float:
        """FLOPs of scores and weighted sum for one query against one cached key, one layer.

        MLA prefill runs the plain form (per head: nope+rope query·key, v-dim values); MLA decode runs
        the weight-absorbed form, attending in the latent (per head: kv_lora+rope scores, kv_lora values)."""
        if not self.mla:
            return 4.0 * self.heads * self.head_dim
        if absorbed:
            return 2.0 * self.heads * (self.kv_lora_rank + self.qk_rope_dim) + 2.0 * self.heads * self.kv_lora_rank
        return 2.0 * self.heads * (self.qk_nope_dim + self.qk_rope_dim) + 2.0 * self.heads * self.v_head_dim

    @property
    def linear_flops_per_token(self) -> float:
        """2 x every matmul weight one token multiplies (the embedding lookup is not a matmul)."""
        return 2.0 * (self.active_params - self.embedding_params)

    def flops_per_token(self, context: int, absorbed: bool) -> float:
        """Forward FLOPs of one token attending to `context` keys, all layers."""
        return self.linear_flops_per_token + self.layers * context * self.attention_core_flops_per_key(absorbed)

    def prefill_flops(self, prompt_len: int) -> float:
        """Forward FLOPs of prefilling one prompt (causal: token i attends to i+1 keys)."""
        keys = prompt_len * (prompt_len + 1) / 2
        return (prompt_len * self.linear_flops_per_token
                + self.layers * keys * self.attention_core_flops_per_key(absorbed=False))

    def decode_bytes_per_token(self, context: int, quant: str, kv_dtype: str) -> float:
        """Bytes one decode step of a single sequence moves on one chip holding the whole model: the
        weights the token touches plus its KV cache over `context` tokens."""
        active_linear = self.active_params - 2 * self.embedding_params - self.moe_layers * self.router_params
        if self.tied_embeddings:
            active_linear += self.embedding_params
        unquantized = self.head_params + self.moe_layers * self.router_params
        return (active_linear * weight_bytes(quant) + unquantized * unquantized_bytes(quant)
                + context * self.kv_bytes_per_token(kv_dtype))

    def summary(self, quant: str = "bf16", kv_dtype: str = "bf16") -> dict:
        return {
            "model": self.name,
            "architecture": self.architecture,
            "attention": "MLA" if self.mla else f"GQA ({self.heads} heads, {self.kv_heads} KV heads)",
            "total_params_B": self.total_params / 1e9,
            "active_params_B": self.active_params / 1e9,
            "mtp_params_B": self.mtp_params / 1e9,
            "weights_GB": self.weight_bytes_total(quant) / 1e9,
            "kv_bytes_per_token": self.kv_bytes_per_token(kv_dtype),
            "linear_GFLOP_per_token": self.linear_flops_per_token / 1e9,
        }


def shape_from_config(config: ModelConfig, name: str = "") -> ModelShape:
    """The planner's view of a parsed config.json; raises UnsupportedArchitectureError for a family
    shoal does not run."""
    model_class(config)  # the same check, and the same message, as loading the model would give
    raw = config.raw
    mla = "kv_lora_rank" in raw and raw.get("kv_lora_rank") is not None
    moe = config.moe
    routed = moe.num_experts if moe is not None else 0
    layers = config.num_hidden_layers
    moe_layers = moe.num_moe_layers if moe is not None else 0
    return ModelShape(
        name=name or config.model_type or config.architecture,
        architecture=config.architecture,
        layers=layers,
        hidden=config.hidden_size,
        vocab=config.vocab_size,
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        mla=mla,
        q_lora_rank=int(config.get("q_lora_rank", 0)) if mla else 0,
        kv_lora_rank=int(config.get("kv_lora_rank", 0)) if mla else 0,
        qk_nope_dim=int(config.get("qk_nope_head_dim", 0)) if mla else 0,
        qk_rope_dim=int(config.get("qk_rope_head_dim", 0)) if mla else 0,
        v_head_dim=int(config.get("v_head_dim", 0)) if mla else 0,
        intermediate=config.intermediate_size,
        dense_layers=layers - moe_layers,
        moe_layers=moe_layers,
        routed_experts=routed,
        shared_experts=-(-moe.shared_intermediate_size // moe.intermediate_size) if routed else 0,
        experts_per_token=moe.experts_per_token if routed else 0,
        moe_intermediate=moe.intermediate_size if routed else 0,
        mtp_layers=int(config.get("num_nextn_predict_layers", 0)),
        tied_embeddings=config.tie_word_embeddings,
    )


BUNDLED_MODELS = Path(__file__).parent / "models"


def load_shape(model: str | Path) -> ModelShape:
    """A folder or config.json file, or the name of a bundled config (shoal/planner/models/NAME)."""
    path = Path(model)
    if not path.exists() and (BUNDLED_MODELS / str(model)).is_dir():
        path = BUNDLED_MODELS / str(model)
    if not path.exists():
        bundled = ", ".join(sorted(p.name for p in BUNDLED_MODELS.iterdir() if p.is_dir()))
        raise ConfigError(f"no model config at {model}; give a checkpoint folder, a config.json, or one of: {bundled}")
    config = load_model_config(path)
    name = path.parent.name if path.is_file() else path.name
    return shape_from_config(config, name=name)
