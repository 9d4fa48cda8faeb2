"""Writes a tiny Hugging Face checkpoint as a GGUF file the way llama.cpp's convert_hf_to_gguf.py does
(Llama q/k rows permuted to ggml's rope layout, DeepSeek experts stacked and kv_b_proj split into
attn_k_b / attn_v_b, Llama 3 rope scaling as a rope_freqs tensor, the vocabulary padded to the model's),
quantizing with gguf.quants. Also returns the weights as the file holds them, in Hugging Face layout,
so a test can build the Hugging Face model that the GGUF file is exactly equal to.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from safetensors.torch import load_file, save_file

_LAYER_PARTS = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
    # Qwen2-MoE's one shared expert and its gate (a vector [hidden] in llama.cpp's files)
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
}
# Hugging Face model_type -> GGUF architecture where they differ (Mixtral is `llama` with experts)
_ARCH = {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "mixtral": "llama"}
_MIXTRAL = {"w1": "gate", "w3": "up", "w2": "down"}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
# the types gguf.quants can write (the K-quants and IQ4 come from llama.cpp's quantizer: tests/gguf/llama_cpp.py)
_TYPES = {t: T[t] for t in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")}


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: Hugging Face's half-split rope rows -> ggml's pairwise rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _type_for(gguf_name: str, arr: np.ndarray, ftype: str) -> T:
    if arr.ndim == 1 or "ffn_gate_inp" in gguf_name or ftype == "F32":
        return T.F32
    qtype = _TYPES[ftype]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if arr.shape[-1] % block == 0 else T.F16  # llama.cpp falls back for odd rows too


def roundtrip(arr: np.ndarray, qtype: T) -> np.ndarray:
    """What a tensor becomes after being stored as `qtype` and read back, in float32."""
    if qtype == T.F32:
        return arr.astype(np.float32)
    if qtype == T.F16:
        return arr.astype(np.float16).astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(arr.astype(np.float32), qtype), qtype).reshape(arr.shape)


def _held(keep: bool, arr: np.ndarray, qtype: T) -> torch.Tensor | None:
    return torch.from_numpy(roundtrip(arr, qtype)) if keep else None


def _write_tensor(writer, name: str, arr: np.ndarray, qtype: T) -> None:
    if qtype == T.F32:
        writer.add_tensor(name, arr.astype(np.float32))
    elif qtype == T.F16:
        writer.add_tensor(name, arr.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(arr.astype(np.float32), qtype), raw_dtype=qtype)


def token_list(hf_dir: Path, vocab_size: int) -> tuple[list[str], list[int], dict[str, int]]:
    """The GGUF token list and token types of hf_dir's tokenizer.json (ids it lacks become unused
    [PAD<id>] tokens), and its token -> id map."""
    tj = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = dict(tj["model"]["vocab"])
    special = {t["content"]: t["id"] for t in tj["added_tokens"] if t.get("special")}
    vocab.update(special)
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if by_id[i] in special else gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    return tokens, types, vocab


def _tokenizer(writer, hf_dir: Path, vocab_size: int) -> None:
    tj = json.loads((hf_dir / "tokenizer.json").read_text())
    tc = json.loads((hf_dir / "tokenizer_config.json").read_text())
    tokens, types, vocab = token_list(hf_dir, vocab_size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab[tc["bos_token"]])
    writer.add_eos_token_id(vocab[tc["eos_token"]])
    writer.add_add_bos_token(bool(tc.get("add_bos_token")))
    writer.add_chat_template(tc["chat_template"])


def _rope_metadata(writer, cfg: dict, head_dim: int, tensors: list) -> None:
    rope = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    writer.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        if rope.get("mscale_all_dim"):
            writer.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])
    elif kind == "llama3":  # LlamaModel.generate_extra_tensors
        base = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old = rope["original_max_position_embeddings"]
        factors = []
        for freq in freqs:
            wavelen = 2 * math.pi / freq
            if wavelen < old / high:
                factors.append(1.0)
            elif wavelen > old / low:
                factors.append(factor)
            else:
                smooth = (old / wavelen - low) / (high - low)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        tensors.append(("rope_freqs.weight", np.array(factors, dtype=np.float32)))


def _load_weights(hf_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of the folder's safetensors files (one file or shards), as float32 arrays."""
    weights = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        weights.update({k: v.float().numpy() for k, v in load_file(str(file)).items()})
    return weights


def _write_metadata(writer, hf_dir: Path, cfg: dict) -> list[tuple[str, np.ndarray]]:
    """The header's key-value pairs (sizes, rope, experts, tokenizer) as llama.cpp's converter writes them;
    returns the extra tensors the metadata implies (Llama 3's rope_freqs)."""
    deepseek = cfg["model_type"].startswith("deepseek")
    heads, n_layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(1 if deepseek else kv_heads)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    extra: list[tuple[str, np.ndarray]] = []
    _rope_metadata(writer, cfg, cfg["qk_rope_head_dim"] if deepseek else head_dim, extra)
    if deepseek:
        rank, rope_dim, nope, v_dim = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
        writer.add_leading_dense_block_count(cfg.get("first_k_dense_replace") or 0)
        if cfg.get("q_lora_rank"):
            writer.add_q_lora_rank(cfg["q_lora_rank"])
        writer.add_kv_lora_rank(rank)
        writer.add_key_length(rank + rope_dim)
        writer.add_value_length(rank)
        writer.add_key_length_mla(nope + rope_dim)
        writer.add_value_length_mla(v_dim)
        writer.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        writer.add_expert_count(cfg["n_routed_experts"])
        writer.add_expert_used_count(cfg["num_experts_per_tok"])
        writer.add_expert_shared_count(cfg["n_shared_experts"])
        writer.add_expert_weights_scale(cfg["routed_scaling_factor"])
        if cfg.get("norm_topk_prob"):
            writer.add_expert_weights_norm(True)
        if cfg.get("n_group") is not None:
            writer.add_expert_group_count(cfg["n_group"])
            writer.add_expert_group_used_count(cfg["topk_group"])
        v3 = cfg["model_type"] == "deepseek_v3"
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if v3 else gguf.ExpertGatingFuncType.SOFTMAX)
        writer.add_rope_dimension_count(rope_dim)
    else:
        writer.add_rope_dimension_count(head_dim)
        if cfg.get("head_dim"):
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        experts = cfg.get("num_experts") or cfg.get("num_local_experts")
        if experts:  # Qwen2/3-MoE, Mixtral: every layer sparse
            writer.add_expert_count(experts)
            writer.add_expert_used_count(cfg["num_experts_per_tok"])
            if cfg.get("moe_intermediate_size"):
                writer.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
            if cfg.get("shared_expert_intermediate_size"):
                writer.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    _tokenizer(writer, hf_dir, cfg["vocab_size"])
    return extra


def convert(
    hf_dir: Path, out: Path, ftype: str = "F32", split_kv_b: bool = True, return_weights: bool = True,
    split_max_tensors: int = 0,
) -> dict[str, torch.Tensor]:
    """Write hf_dir as a GGUF file at `out`; return the weights it holds, dequantized, under Hugging Face
    names (an empty dict with return_weights=False, which skips the round trip: benchmarks/compare_cpu.py).
    split_max_tensors > 0 writes a split set instead, out-0000K-of-0000N.gguf, as convert_hf_to_gguf's
    --split-max-tensors does."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    weights = _load_weights(hf_dir)
    deepseek = cfg["model_type"].startswith("deepseek")
    arch = "deepseek2" if deepseek else _ARCH.get(cfg["model_type"], cfg["model_type"])
    writer = gguf.GGUFWriter(str(out), arch, split_max_tensors=split_max_tensors)
    extra = _write_metadata(writer, hf_dir, cfg)
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    if deepseek:
        rank, nope, v_dim = cfg["kv_lora_rank"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]

    held: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    tensors: list[tuple[str, np.ndarray]] = list(extra)
    for name, arr in weights.items():
        if name in _GLOBAL:
            tensors.append((_GLOBAL[name], arr))
            held[name] = _held(return_weights, arr, _type_for(_GLOBAL[name], arr, ftype))
            continue
        layer, rest = re.match(r"model\.layers\.(\d+)\.(.+)$", name).groups()
        layer = int(layer)
        expert = re.match(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$", rest)
        mixtral = re.match(r"block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$", rest)
        if expert or mixtral:
            index, which = (int(expert.group(1)), expert.group(2)) if expert else (int(mixtral.group(1)), _MIXTRAL[mixtral.group(2)])
            experts.setdefault((layer, which), {})[index] = arr
            held[name] = _held(return_weights, arr, _type_for("ffn_exps", arr, ftype))
            continue
        if rest == "self_attn.kv_b_proj.weight":
            held[name] = _held(return_weights, arr, _type_for("attn_kv_b", arr, ftype))
            if split_kv_b:  # DeepseekV2Model.modify_tensors
                kv_b = arr.reshape(heads, nope + v_dim, rank)
                tensors.append((f"blk.{layer}.attn_k_b.weight", np.ascontiguousarray(kv_b[:, :nope].transpose(0, 2, 1))))
                tensors.append((f"blk.{layer}.attn_v_b.weight", np.ascontiguousarray(kv_b[:, nope:])))
            else:
                tensors.append((f"blk.{layer}.attn_kv_b.weight", arr))
            continue
        part = _LAYER_PARTS[rest.replace("block_sparse_moe.gate.", "mlp.gate.")]
        held[name] = _held(return_weights, arr, _type_for(part, arr, ftype))
        if part == "ffn_gate_inp_shexp.weight":
            arr = arr.reshape(-1)
        if arch == "llama" and part.startswith("attn_q."):
            arr = permute(arr, heads)
        elif arch == "llama" and part.startswith("attn_k."):
            arr = permute(arr, kv_heads)
        tensors.append((f"blk.{layer}.{part}", arr))
    for (layer, which), by_index in sorted(experts.items()):
        stacked = np.stack([by_index[i] for i in range(len(by_index))])
        tensors.append((f"blk.{layer}.ffn_{which}_exps.weight", stacked))
    for name, arr in tensors:
        _write_tensor(writer, name, arr, _type_for(name, arr, ftype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {k: v for k, v in held.items() if v is not None}


def convert_streaming_f16(hf_dir: Path, out: Path) -> None:
    """Write a dense Llama-family folder (no experts) as an F16 GGUF file holding one tensor in memory at a
    time, as convert_hf_to_gguf.py --outtype f16 does (norms and rope_freqs F32): for checkpoints too big
    to load whole (benchmarks/real_size.py)."""
    from safetensors import safe_open

    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = _ARCH.get(cfg["model_type"], cfg["model_type"])
    if arch != "llama" or cfg.get("num_local_experts") or cfg.get("num_experts"):
        raise ValueError(f"convert_streaming_f16 writes dense Llama checkpoints only, not {cfg['model_type']}")
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    writer = gguf.GGUFWriter(str(out), arch)
    extra = _write_metadata(writer, hf_dir, cfg)
    handles = [safe_open(str(f), "pt") for f in sorted(hf_dir.glob("*.safetensors"))]
    names = [(h, n) for h in handles for n in h.keys()]

    def gguf_name(name: str) -> str:
        if name in _GLOBAL:
            return _GLOBAL[name]
        layer, rest = re.match(r"model\.layers\.(\d+)\.(.+)$", name).groups()
        return f"blk.{layer}.{_LAYER_PARTS[rest]}"

    def array(handle, name: str) -> np.ndarray:
        arr = handle.get_tensor(name).float().numpy()
        part = gguf_name(name)
        if part.endswith("attn_q.weight"):
            arr = permute(arr, heads)
        elif part.endswith("attn_k.weight"):
            arr = permute(arr, kv_heads)
        return arr.astype(np.float16 if arr.ndim == 2 else np.float32)

    for name, arr in extra:
        writer.add_tensor_info(name, arr.shape, arr.dtype, arr.nbytes)
    for handle, name in names:
        shape = tuple(handle.get_slice(name).get_shape())
        dtype = np.dtype(np.float16 if len(shape) == 2 else np.float32)
        writer.add_tensor_info(gguf_name(name), shape, dtype, int(np.prod(shape)) * dtype.itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, arr in extra:
        writer.write_tensor_data(arr)
    for handle, name in names:
        writer.write_tensor_data(array(handle, name))
    writer.close()


def save_hf_folder(hf_dir: Path, weights: dict[str, torch.Tensor], out: Path) -> Path:
    """A copy of hf_dir (config, tokenizer) holding `weights` instead of its own."""
    out.mkdir(parents=True, exist_ok=True)
    for file in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (hf_dir / file).is_file():
            (out / file).write_bytes((hf_dir / file).read_bytes())
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"))
    return out
