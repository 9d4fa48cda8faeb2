"""Model families, chosen by config.json's `architectures`."""

from __future__ import annotations

from shoal.errors import UnsupportedArchitectureError
from shoal.models.base import CausalLM
from shoal.models.deepseek import DeepseekForCausalLM
from shoal.models.hf_config import ModelConfig
from shoal.models.llama import LlamaForCausalLM, MixtralForCausalLM, Qwen2MoeForCausalLM

ARCHITECTURES: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "DeepseekV2ForCausalLM": DeepseekForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekForCausalLM,
}


def model_class(config: ModelConfig) -> type[CausalLM]:
    """The class implementing config.json's architecture, or a clear error listing what is supported."""
    cls = ARCHITECTURES.get(config.architecture)
    if cls is None:
        raise UnsupportedArchitectureError(
            f"architecture {config.architecture!r} is not supported; shoal runs {', '.join(sorted(ARCHITECTURES))}"
        )
    return cls


__all__ = ["ARCHITECTURES", "CausalLM", "ModelConfig", "model_class"]
