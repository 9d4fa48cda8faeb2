"""GGUF tensor names -> the Hugging Face checkpoint names shoal's model families load, plus the reshaping
llama.cpp's converter applied on the way in (and that has to be undone on the way out):

- Llama's q/k rows are permuted from Hugging Face's half-split rope layout to ggml's pairwise one;
  `unpermute_rows` restores it. It only moves whole rows, so it applies unchanged to quantized blocks
  (values and scales) as well as to float weights.
- Routed experts (DeepSeek, Qwen2/3-MoE, Mixtral) are stacked into one [experts, out, in] tensor per
  projection; Qwen2-MoE's shared-expert gate is a vector, a matrix of one row again.
- DeepSeek's kv_b_proj is stored (since llama.cpp's MLA change) as attn_k_b (per head, transposed)
  and attn_v_b; older files keep attn_kv_b itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from shoal.models.hf_config import ModelConfig

_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)$")

_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# per-layer GGUF tensor -> module path under model.layers.N
_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # DeepSeek (deepseek2)
    "attn_q_a": "self_attn.q_a_proj",
    "attn_q_a_norm": "self_attn.q_a_layernorm",
    "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj",
    "ffn_gate_inp": "mlp.gate",
    "exp_probs_b": "mlp.gate",  # exp_probs_b.bias -> mlp.gate.e_score_correction_bias
    "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
    "ffn_up_shexp": "mlp.shared_experts.up_proj",
    "ffn_down_shexp": "mlp.shared_experts.down_proj",
    # Qwen2-MoE (qwen2moe): its shared expert's one-row sigmoid gate, stored as a vector [hidden]
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
_EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
IGNORED = ("rope_freqs.weight",)  # read into the config (Llama 3 rope scaling), not a weight


@dataclass(frozen=True)
class Step:
    """One Hugging Face tensor (or, for stacked experts, one per expert) made from GGUF tensors.

    kind: "copy"; "unpermute" (Llama q/k rows, `heads` heads); "experts" (split along dim 0 into
    `hf_name` formatted with each expert index); "kv_b" (attn_k_b + attn_v_b -> kv_b_proj).
    """

    hf_name: str
    sources: tuple[str, ...]
    kind: str = "copy"
    heads: int = 0


def unpermute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation: within each head, rows (0, 2, 4, .., 1, 3, ..) back to (0, 1, 2, ..)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def merge_kv_b(k_b: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """attn_k_b [heads, rank, nope] and attn_v_b [heads, v, rank] -> kv_b_proj [heads * (nope + v), rank]."""
    rank = k_b.shape[1]
    return torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(-1, rank)


def plan(tensor_names: list[str], config: ModelConfig, gguf_arch: str) -> list[Step]:
    """The steps that turn the file's tensors into the checkpoint names the model loads, in file order."""
    llama_rope = gguf_arch == "llama"  # only Llama's converter permutes q/k (Qwen and DeepSeek keep their layout)
    names = set(tensor_names)
    steps: list[Step] = []
    for name in tensor_names:
        if name in IGNORED:
            continue
        if name in _GLOBAL:
            steps.append(Step(_GLOBAL[name], (name,)))
            continue
        match = _BLOCK.match(name)
        if match is None:
            steps.append(Step(name, (name,)))  # unknown: the model reports it as unused
            continue
        layer, part, suffix = match.groups()
        prefix = f"model.layers.{layer}."
        if part in _EXPERTS and suffix == "weight":
            steps.append(Step(f"{prefix}mlp.experts.{{}}.{_EXPERTS[part]}.weight", (name,), "experts"))
        elif part == "exp_probs_b":
            steps.append(Step(f"{prefix}mlp.gate.e_score_correction_bias", (name,)))
        elif part == "attn_k_b":
            v_b = f"blk.{layer}.attn_v_b.weight"
            if f"blk.{layer}.attn_kv_b.weight" not in names and v_b in names:
                steps.append(Step(f"{prefix}self_attn.kv_b_proj.weight", (name, v_b), "kv_b"))
        elif part == "attn_v_b":
            continue  # consumed with attn_k_b, or redundant next to attn_kv_b
        elif part in _LAYER:
            hf_name = f"{prefix}{_LAYER[part]}.{suffix}"
            if llama_rope and part == "attn_q":
                steps.append(Step(hf_name, (name,), "unpermute", config.num_attention_heads))
            elif llama_rope and part == "attn_k":
                steps.append(Step(hf_name, (name,), "unpermute", config.num_key_value_heads))
            else:
                steps.append(Step(hf_name, (name,)))
        else:
            steps.append(Step(name, (name,)))
    return steps
