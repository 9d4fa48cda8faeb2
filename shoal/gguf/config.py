"""GGUF metadata (`llama.*`, `qwen2.*`, `qwen3.*`, `deepseek2.*` keys) -> the config.json-style dict that
shoal.models.hf_config parses, so a GGUF model and its Hugging Face checkpoint build the same ModelConfig.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from shoal.errors import ConfigError, UnsupportedArchitectureError
from shoal.gguf.reader import GGUFFile
from shoal.models.hf_config import ModelConfig, parse_model_config

# GGUF general.architecture -> (transformers architecture, model_type)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "deepseek2": ("DeepseekV2ForCausalLM", "deepseek_v2"),  # V3 when the router uses sigmoid gating
    "qwen2moe": ("Qwen2MoeForCausalLM", "qwen2_moe"),
    "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),  # and `llama` with experts: Mixtral
}
MAX_CONTEXT = 1 << 24  # a larger context_length is a damaged header, and would size the KV cache
MAX_COUNT = 1 << 20  # layers, heads, experts: anything larger is a damaged header
_FLOAT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class _Meta:
    """Typed access to one architecture's metadata keys, with messages that name the key."""

    def __init__(self, file: GGUFFile, arch: str) -> None:
        self.file, self.arch = file, arch

    def get(self, suffix: str, default: Any = None) -> Any:
        return self.file.metadata(f"{self.arch}.{suffix}", default)

    def int(
        self, suffix: str, default: int | None = None, required: bool = True, limit: int = MAX_COUNT, minimum: int = 1
    ) -> int | None:
        value = self.get(suffix)
        if value is None:
            if default is None and required:
                raise ConfigError(f"{self.file.path} lacks metadata {self.arch}.{suffix}, which shoal needs")
            return default
        if isinstance(value, list):  # per-layer arrays (e.g. head_count_kv): shoal needs one value
            if not value or any(v != value[0] for v in value):
                raise ConfigError(f"{self.file.path}: {self.arch}.{suffix} varies per layer, which shoal does not support")
            value = value[0]
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= limit:
            raise ConfigError(
                f"{self.file.path}: {self.arch}.{suffix} is {value!r}; expected an integer in {minimum}..{limit}"
            )
        return value

    def float(self, suffix: str, default: float | None = None) -> float | None:
        value = self.get(suffix)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{self.file.path}: {self.arch}.{suffix} is {value!r}; expected a number")
        return float(value)


def _checkpoint_dtype(file: GGUFFile) -> str | None:
    """The float type holding most bytes, if a float type does; None for quantized files (dtype then by device)."""
    by_type: dict[str, int] = {}
    for t in file.tensors.values():
        by_type[t.type_name] = by_type.get(t.type_name, 0) + t.n_bytes
    main = max(by_type, key=by_type.get) if by_type else None
    return _FLOAT_DTYPES.get(main) if main else None


def _rope(meta: _Meta, raw: dict[str, Any]) -> None:
    raw["rope_theta"] = meta.float("rope.freq_base", 10000.0)
    kind = meta.get("rope.scaling.type")
    factor = meta.float("rope.scaling.factor")
    if kind in (None, "none") or (kind == "linear" and not factor):
        return
    if kind not in ("linear", "yarn"):
        raise ConfigError(f"{meta.file.path} asks for rope scaling {kind!r}; shoal reads none, linear and yarn from GGUF")
    scaling: dict[str, Any] = {"rope_type": kind, "factor": factor or 1.0}
    if kind == "yarn":
        scaling["original_max_position_embeddings"] = meta.int("rope.scaling.original_context_length", required=False)
        for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if meta.get(f"rope.scaling.{key}") is not None:
                scaling[name] = meta.float(f"rope.scaling.{key}")
        log_mul = meta.float("rope.scaling.yarn_log_multiplier")
        if log_mul:
            # llama.cpp stores DeepSeek's mscale_all_dim as 0.1 * mscale_all_dim and assumes mscale equals it
            scaling["mscale"] = scaling["mscale_all_dim"] = log_mul / 0.1
    raw["rope_scaling"] = scaling


def gguf_to_hf_config(file: GGUFFile) -> dict[str, Any]:
    """The config.json shoal would have read from the model's Hugging Face checkpoint."""
    arch = file.architecture
    if arch not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{file.path} holds a {arch!r} model; shoal runs GGUF files of architecture {', '.join(ARCHITECTURES)}"
        )
    architecture, model_type = ARCHITECTURES[arch]
    meta = _Meta(file, arch)
    embed = file.tensors.get("token_embd.weight")
    if embed is None or len(embed.shape) != 2:
        raise ConfigError(f"{file.path} has no 2-D token_embd.weight tensor; it is incomplete")
    vocab_size, hidden = embed.shape
    if meta.int("embedding_length", limit=1 << 24) != hidden:
        raise ConfigError(f"{file.path}: {arch}.embedding_length disagrees with token_embd.weight's shape {list(embed.shape)}")
    heads = meta.int("attention.head_count")
    raw: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "num_hidden_layers": meta.int("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.int("attention.head_count_kv", default=heads),
        "intermediate_size": meta.int("feed_forward_length", limit=1 << 24),
        "rms_norm_eps": meta.float("attention.layer_norm_rms_epsilon", 1e-6),
        "max_position_embeddings": meta.int("context_length", default=4096, limit=MAX_CONTEXT),
        "tie_word_embeddings": "output.weight" not in file.tensors,
        "dtype": _checkpoint_dtype(file),
    }
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        value = file.metadata(f"tokenizer.ggml.{key}")
        if isinstance(value, int) and 0 <= value < vocab_size:
            raw[name] = value
    eos = [raw["eos_token_id"]] if "eos_token_id" in raw else []
    for key in ("eot_token_id", "eom_token_id"):
        value = file.metadata(f"tokenizer.ggml.{key}")
        if isinstance(value, int) and 0 <= value < vocab_size and value not in eos:
            eos.append(value)
    if eos:
        raw["eos_token_id"] = eos
    _rope(meta, raw)
    if arch == "deepseek2":
        _deepseek2(meta, file, raw)
    else:
        head_dim = meta.int("attention.key_length", required=False, limit=1 << 16)
        if head_dim:
            raw["head_dim"] = head_dim
        raw["attention_bias"] = "blk.0.attn_q.bias" in file.tensors and arch not in ("qwen2", "qwen2moe")
        if arch == "qwen2moe":
            raw["qkv_bias"] = "blk.0.attn_q.bias" in file.tensors
        _llama_experts(meta, raw)
    return raw


def _llama_experts(meta: _Meta, raw: dict[str, Any]) -> None:
    """Routed experts of the Llama family's files: qwen3moe and qwen2moe, and `llama` with experts
    (Mixtral). llama.cpp fixes the renormalisation per architecture: qwen3moe and Mixtral renormalise the
    top-k weights, qwen2moe does not. A layer is sparse where the file holds its router (ffn_gate_inp):
    every layer in llama.cpp's own files."""
    experts = meta.int("expert_count", required=False)
    if not experts:
        if meta.arch in ("qwen2moe", "qwen3moe"):
            raise ConfigError(f"{meta.file.path} is a {meta.arch} file without {meta.arch}.expert_count")
        return
    top_k = meta.int("expert_used_count")
    if meta.arch == "llama":
        raw["architectures"], raw["model_type"] = ["MixtralForCausalLM"], "mixtral"
        raw.update(num_local_experts=experts, num_experts_per_tok=top_k)
        return
    raw.update(
        num_experts=experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=meta.int("expert_feed_forward_length", limit=1 << 24),
        decoder_sparse_step=1,
        mlp_only_layers=[i for i in range(raw["num_hidden_layers"]) if f"blk.{i}.ffn_gate_inp.weight" not in meta.file.tensors],
        norm_topk_prob=meta.arch == "qwen3moe",
    )
    if meta.arch == "qwen2moe":
        raw["shared_expert_intermediate_size"] = meta.int(
            "expert_shared_feed_forward_length", default=0, required=False, minimum=0, limit=1 << 24
        )


def _deepseek2(meta: _Meta, file: GGUFFile, raw: dict[str, Any]) -> None:
    heads = raw["num_attention_heads"]
    raw["num_key_value_heads"] = heads  # llama.cpp writes 1 (MLA as MQA); the Hugging Face config has heads
    rope_dim = meta.int("rope.dimension_count")
    raw["qk_rope_head_dim"] = rope_dim
    raw["kv_lora_rank"] = meta.int("attention.kv_lora_rank")
    raw["q_lora_rank"] = meta.int("attention.q_lora_rank", required=False)
    if meta.get("attention.key_length_mla") is not None:  # since llama.cpp's MLA change (2025)
        qk_head_dim, v_head_dim = meta.int("attention.key_length_mla"), meta.int("attention.value_length_mla")
    else:
        qk_head_dim, v_head_dim = meta.int("attention.key_length"), meta.int("attention.value_length")
    if qk_head_dim <= rope_dim:
        raise ConfigError(f"{file.path}: the key length {qk_head_dim} must exceed the rope dimension {rope_dim}")
    raw["qk_nope_head_dim"] = qk_head_dim - rope_dim
    raw["v_head_dim"] = v_head_dim
    experts = meta.int("expert_count", required=False)
    if experts:
        sigmoid = meta.get("expert_gating_func") == 2
        groups = meta.int("expert_group_count", default=1)
        has_bias = any(name.endswith("exp_probs_b.bias") for name in file.tensors)
        if sigmoid:
            raw["architectures"], raw["model_type"] = ["DeepseekV3ForCausalLM"], "deepseek_v3"
            topk_method = "noaux_tc" if has_bias else "greedy"
        else:
            topk_method = "group_limited_greedy" if groups > 1 else "greedy"
        raw.update(
            n_routed_experts=experts,
            num_experts_per_tok=meta.int("expert_used_count"),
            n_shared_experts=meta.int("expert_shared_count", default=0, required=False, minimum=0),
            moe_intermediate_size=meta.int("expert_feed_forward_length", limit=1 << 24),
            first_k_dense_replace=meta.int("leading_dense_block_count", default=0, required=False, minimum=0),
            moe_layer_freq=1,
            n_group=groups,
            topk_group=meta.int("expert_group_used_count", default=1),
            routed_scaling_factor=meta.float("expert_weights_scale", 1.0),
            norm_topk_prob=bool(meta.get("expert_weights_norm", False)),
            scoring_func="sigmoid" if sigmoid else "softmax",
            topk_method=topk_method,
        )
    raw["rope_interleave"] = True  # llama.cpp runs deepseek2 with pairwise (GPT-J style) rope, as DeepSeek does


def load_gguf_config(file: GGUFFile) -> ModelConfig:
    """Validate the metadata once, here, and return the ModelConfig the model families build from."""
    config = parse_model_config(gguf_to_hf_config(file), str(file.path))
    freqs = file.tensors.get("rope_freqs.weight")
    if freqs is not None and config.model_type != "deepseek_v2" and config.model_type != "deepseek_v3":
        from shoal.gguf.dequant import to_torch

        rope_dim = config.head_dim
        if freqs.shape != (rope_dim // 2,):
            raise ConfigError(f"{file.path}: rope_freqs.weight has shape {list(freqs.shape)}; expected [{rope_dim // 2}]")
        factors = to_torch(freqs.type_name, file.raw(freqs.name), freqs.shape).float()
        if not bool(factors.isfinite().all()) or bool((factors <= 0).any()):
            raise ConfigError(f"{file.path}: rope_freqs.weight holds non-positive or non-finite factors")
        config.rope = dataclasses.replace(config.rope, frequency_factors=tuple(factors.tolist()))
    return config
