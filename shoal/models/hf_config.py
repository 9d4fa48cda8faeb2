"""Reads a checkpoint's config.json into one ModelConfig that every model family, the loader and the planner share.

Both spellings that exist in the wild are accepted: the original `rope_scaling` + `rope_theta`
fields and transformers 5's `rope_parameters`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shoal.errors import ConfigError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


@dataclass
class RopeConfig:
    """Rotary position embedding parameters, normalised across config spellings."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    partial_rotary_factor: float = 1.0
    # per-dimension divisors of the frequencies, as GGUF files store Llama 3's scaling (`rope_freqs`)
    frequency_factors: tuple[float, ...] | None = None


@dataclass(frozen=True)
class MoeConfig:
    """Routed experts, whichever family's spelling config.json uses: DeepSeek's (n_routed_experts,
    first_k_dense_replace / moe_layer_freq, n_shared_experts), Qwen2/3-MoE's (num_experts,
    decoder_sparse_step / mlp_only_layers, shared_expert_intermediate_size) or Mixtral's
    (num_local_experts, intermediate_size, every layer)."""

    num_experts: int
    experts_per_token: int
    intermediate_size: int  # of one routed expert
    shared_intermediate_size: int  # of the always-on shared expert(s) together; 0: none
    layers: tuple[bool, ...]  # per decoder layer, whether its MLP is the MoE block

    @property
    def num_moe_layers(self) -> int:
        return sum(self.layers)


def parse_moe(raw: dict[str, Any], num_layers: int, intermediate_size: int) -> MoeConfig | None:
    """The routed experts config.json declares, or None for a dense model."""
    def field(key: str, default: Any = 0) -> Any:
        value = raw.get(key)
        return default if value is None else value

    mixtral = raw.get("model_type") == "mixtral" or "MixtralForCausalLM" in (raw.get("architectures") or [])
    qwen = any(key in raw for key in ("decoder_sparse_step", "mlp_only_layers", "moe_intermediate_size"))
    if field("n_routed_experts"):  # DeepSeek
        experts, inter = int(raw["n_routed_experts"]), int(field("moe_intermediate_size", intermediate_size))
        first, freq = int(field("first_k_dense_replace")), max(1, int(field("moe_layer_freq", 1)))
        layers = tuple(i >= first and i % freq == 0 for i in range(num_layers))
        shared = int(field("n_shared_experts")) * inter
    elif mixtral or (field("num_local_experts") and not qwen):
        # Mixtral: every layer, experts the size of the dense MLP (whatever else config.json says)
        experts, inter, shared = int(field("num_local_experts")), intermediate_size, 0
        if not experts:
            return None
        layers = (True,) * num_layers
    elif qwen:  # Qwen2/3-MoE (transformers 5 writes Qwen3-MoE's num_experts as num_local_experts)
        experts = int(field("num_experts") or field("num_local_experts"))
        if not experts:
            return None
        inter = int(field("moe_intermediate_size", intermediate_size))
        step, dense = max(1, int(field("decoder_sparse_step", 1))), set(field("mlp_only_layers", []))
        layers = tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers))
        shared = int(field("shared_expert_intermediate_size"))
    else:
        return None
    top_k = int(field("num_experts_per_tok"))
    if not 0 < top_k <= experts:
        raise ConfigError(f"config.json: num_experts_per_tok ({top_k}) must be between 1 and the {experts} experts")
    return MoeConfig(experts, top_k, inter, shared, layers)


@dataclass
class ModelConfig:
    """The fields every family needs, plus the raw dict for family-specific ones."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: RopeConfig
    checkpoint_dtype: torch.dtype | None
    bos_token_id: int | None
    eos_token_ids: list[int]
    moe: MoeConfig | None = None  # routed experts, for a mixture-of-experts model
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    # Draft modules to build with the model (1: DeepSeek's MTP module, for --speculative mtp); not a
    # config.json field: the engine sets it when it asks for the draft.
    draft_layers: int = 0

    def get(self, key: str, default: Any = None) -> Any:
        """A family-specific field; a present-but-null value reads as `default`."""
        value = self.raw.get(key)
        return default if value is None else value


def _as_int_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def parse_rope(raw: dict[str, Any]) -> RopeConfig:
    """Normalise `rope_parameters` (transformers >= 5) or `rope_scaling` + `rope_theta` (older files)."""
    params: dict[str, Any] = {}
    if isinstance(raw.get("rope_parameters"), dict):
        params.update(raw["rope_parameters"])
    if isinstance(raw.get("rope_scaling"), dict):
        params.update(raw["rope_scaling"])
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"config.json asks for rope scaling type {rope_type!r}; shoal supports {', '.join(SUPPORTED_ROPE_TYPES)}"
        )

    def number(key: str, default: Any) -> Any:
        value = params.get(key)
        return default if value is None else value

    return RopeConfig(
        theta=float(theta),
        type=rope_type,
        factor=float(number("factor", 1.0)),
        original_max_position_embeddings=params.get("original_max_position_embeddings"),
        low_freq_factor=float(number("low_freq_factor", 1.0)),
        high_freq_factor=float(number("high_freq_factor", 4.0)),
        beta_fast=float(number("beta_fast", 32.0)),
        beta_slow=float(number("beta_slow", 1.0)),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(number("truncate", True)),
        partial_rotary_factor=float(number("partial_rotary_factor", raw.get("partial_rotary_factor") or 1.0)),
    )


# Sane bounds on a config.json's sizes, checked before anything is allocated: an untrusted checkpoint with
# "num_hidden_layers": 1000000 would otherwise allocate until the kernel kills the process. Each is well
# beyond every published model (DeepSeek-V3: 61 layers, 7168 hidden, 256 experts; Llama 4: 202048 vocab).
SIZE_BOUNDS = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 16,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 4096,
    "intermediate_size": 1 << 20,
    "max_position_embeddings": 1 << 24,
    "moe_intermediate_size": 1 << 20,
    "n_routed_experts": 4096,
    "num_local_experts": 4096,
    "num_experts": 4096,
    "num_experts_per_tok": 4096,
    "n_shared_experts": 64,
    "kv_lora_rank": 1 << 16,
    "q_lora_rank": 1 << 16,
    "qk_nope_head_dim": 4096,
    "qk_rope_head_dim": 4096,
    "v_head_dim": 4096,
    "first_k_dense_replace": 1024,
    "sliding_window": 1 << 24,
}


def check_sizes(raw: dict[str, Any], path: str = "config.json") -> None:
    """Refuse a size that is not a positive integer within SIZE_BOUNDS (null and absent fields pass)."""
    for key, bound in SIZE_BOUNDS.items():
        value = raw.get(key)
        if value is None:
            continue
        # 0 is a real value of these: no dense first layers, no shared expert, no sliding window (Qwen2-MoE
        # writes sliding_window 0 beside use_sliding_window false), no non-rotary part of an MLA head
        minimum = 0 if key in ("first_k_dense_replace", "n_shared_experts", "sliding_window", "qk_nope_head_dim") else 1
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= bound:
            raise ConfigError(f"{path}: {key} is {str(value)[:40]}, outside {minimum} to {bound}; the checkpoint's "
                              "config.json is damaged or not meant for shoal")


def _require(raw: dict[str, Any], key: str, path: str) -> Any:
    value = raw.get(key)
    if value is None:
        raise ConfigError(f"{path} has no {key!r}; it does not look like a causal language model config")
    return value


def parse_model_config(raw: dict[str, Any], path: str = "config.json") -> ModelConfig:
    """Validate a config.json dict once, here, so model code can trust every field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    architectures = raw.get("architectures")
    if not architectures or not isinstance(architectures, list):
        raise ConfigError(
            f"{path} has no 'architectures' list, so shoal cannot tell which model it is; "
            "add e.g. \"architectures\": [\"LlamaForCausalLM\"]"
        )
    check_sizes(raw, path)
    for key in ("rms_norm_eps", "rope_theta"):
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise ConfigError(f"{path}: {key} must be a positive number, got {str(value)[:40]}")
    hidden_size = int(_require(raw, "hidden_size", path))
    num_heads = int(_require(raw, "num_attention_heads", path))
    num_kv_heads = int(raw.get("num_key_value_heads") or num_heads)
    if num_heads % num_kv_heads:
        raise ConfigError(
            f"{path}: num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})"
        )
    dtype_name = raw.get("dtype") or raw.get("torch_dtype")
    num_layers = int(_require(raw, "num_hidden_layers", path))
    intermediate_size = int(raw.get("intermediate_size") or 4 * hidden_size)
    return ModelConfig(
        architecture=str(architectures[0]),
        model_type=str(raw.get("model_type", "")),
        vocab_size=int(_require(raw, "vocab_size", path)),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=int(raw.get("head_dim") or hidden_size // num_heads),
        intermediate_size=intermediate_size,
        rms_norm_eps=float(raw.get("rms_norm_eps") or 1e-6),
        max_position_embeddings=int(raw.get("max_position_embeddings") or 4096),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        rope=parse_rope(raw),
        checkpoint_dtype=_DTYPES.get(str(dtype_name)) if dtype_name else None,
        bos_token_id=raw.get("bos_token_id") if isinstance(raw.get("bos_token_id"), int) else None,
        eos_token_ids=_as_int_list(raw.get("eos_token_id")),
        moe=parse_moe(raw, num_layers, intermediate_size),
        raw=raw,
    )


def estimated_parameters(config: ModelConfig) -> int:
    """About how many weights the model stores (attention as if unfactored, every expert counted): enough to
    tell, before allocating, whether a checkpoint can fit a device at all."""
    h, layers = config.hidden_size, config.num_hidden_layers
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    attention = h * config.head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    experts = config.get("n_routed_experts") or config.get("num_local_experts") or config.get("num_experts") or 0
    if experts:
        moe = config.get("moe_intermediate_size", config.intermediate_size)
        mlp = 3 * h * moe * (experts + config.get("n_shared_experts", 0)) + h * experts
    else:
        mlp = 3 * h * config.intermediate_size
    return embeddings + layers * (attention + mlp)


def load_model_config(path: str | Path) -> ModelConfig:
    """Read and validate `path` (a config.json file or a folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json at {path}; point --model at a Hugging Face checkpoint folder")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    return parse_model_config(raw, str(path))


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """'bfloat16' / 'bf16' / torch.bfloat16 -> torch.bfloat16; None or 'auto' -> None."""
    if name is None or isinstance(name, torch.dtype):
        return name
    aliases = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    key = aliases.get(name.lower(), name.lower())
    if key == "auto":
        return None
    if key not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    return _DTYPES[key]
