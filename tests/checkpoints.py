"""Builds tiny random checkpoints with transformers (the reference) for the parity tests.

Each entry of ARCHITECTURES is a transformers config class name and the keyword arguments of a
small model that still exercises the family's distinguishing feature.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 384

_LLAMA_BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=0,
    eos_token_id=1,
    initializer_range=0.08,
)

_DEEPSEEK_BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    max_position_embeddings=256,
    bos_token_id=0,
    eos_token_id=1,
    initializer_range=0.08,
)

ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(_LLAMA_BASE, tie_word_embeddings=False)),
    "llama-tied-llama3-rope": (
        "LlamaConfig",
        dict(
            _LLAMA_BASE,
            tie_word_embeddings=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
    ),
    "llama-linear-rope": ("LlamaConfig", dict(_LLAMA_BASE, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama-yarn-rope": (
        "LlamaConfig",
        dict(
            _LLAMA_BASE,
            rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
        ),
    ),
    "qwen2": ("Qwen2Config", dict(_LLAMA_BASE, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(_LLAMA_BASE, head_dim=32, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(_LLAMA_BASE, sliding_window=24, tie_word_embeddings=False)),
    # Qwen3-MoE: Qwen3's q/k norms, softmax top-2 renormalised; layer 0 dense (mlp_only_layers).
    "qwen3-moe": (
        "Qwen3MoeConfig",
        dict(_LLAMA_BASE, head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
             norm_topk_prob=True, mlp_only_layers=[0], tie_word_embeddings=False),
    ),
    # Qwen2-MoE: q/k/v biases, top-2 not renormalised, a shared expert behind its sigmoid gate, every layer sparse.
    "qwen2-moe": (
        "Qwen2MoeConfig",
        dict(_LLAMA_BASE, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
             shared_expert_intermediate_size=64, norm_topk_prob=False, tie_word_embeddings=False),
    ),
    # Mixtral: block_sparse_moe with w1 / w2 / w3, top-2 of 4 experts the dense MLP's size, every layer.
    "mixtral": (
        "MixtralConfig",
        dict(_LLAMA_BASE, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
    ),
    # V2-Lite-like: no q_lora_rank, softmax routing, greedy top-k, first layer dense.
    "deepseek-v2-lite": (
        "DeepseekV2Config",
        dict(_DEEPSEEK_BASE, q_lora_rank=None, first_k_dense_replace=1, topk_method="greedy"),
    ),
    # V2-like: q_lora_rank and group-limited greedy routing.
    "deepseek-v2-grouped": (
        "DeepseekV2Config",
        dict(
            _DEEPSEEK_BASE,
            q_lora_rank=32,
            first_k_dense_replace=0,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.0,
        ),
    ),
    # V3-like: q_lora_rank, sigmoid routing with correction bias, groups, dense first layer, YaRN with mscale.
    "deepseek-v3": (
        "DeepseekV3Config",
        dict(
            _DEEPSEEK_BASE,
            q_lora_rank=32,
            first_k_dense_replace=1,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            rope_scaling={
                "type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "mscale": 0.707,
                "mscale_all_dim": 0.707,
                "beta_fast": 32,
                "beta_slow": 1,
            },
        ),
    ),
}


SPECIAL_TOKENS = ("<s>", "</s>")  # ids 0 and 1 in both tokenizers below


def write_tokenizer(path: Path, vocab_size: int = 300) -> None:
    """A small byte-level BPE (tokenizer.json + tokenizer_config.json), trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = ["The quick brown fox jumps over the lazy dog. ", "Héllo wörld, naïve café — 日本語 ✓. "] * 20
    tok.train_from_iterator(text, trainer)
    tok.save(str(path / "tokenizer.json"))
    _write_tokenizer_config(path)


def _write_tokenizer_config(path: Path) -> None:
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "add_bos_token": True,
                "chat_template": "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}",
            }
        )
    )


def write_full_tokenizer(path: Path, vocab_size: int) -> None:
    """A byte-level BPE with exactly `vocab_size` ids, each but <s> and </s> with text (benchmark checkpoints).

    write_tokenizer's trained one knows a few hundred ids, so a random model's output has no text and
    a server streams nothing until the end. This one is built without training: <s> and </s>, the 256
    byte-level alphabet tokens, then merges making every pair of ASCII letters and then letter pairs
    plus one more letter, until there are vocab_size tokens. Same tokenizer_config.json (bos, eos,
    chat template) as write_tokenizer.
    """
    import string

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    if vocab_size < len(vocab):
        raise ValueError(f"write_full_tokenizer: vocab_size {vocab_size} is below its {len(vocab)} special and byte "
                         "tokens; pass a larger vocab_size or use write_tokenizer")
    letters = string.ascii_letters  # byte-level text of ASCII letters is the letters themselves
    pairs = [a + b for a in letters for b in letters]
    merges: list[tuple[str, str]] = []
    for left, right in [(p[0], p[1]) for p in pairs] + [(p, c) for p in pairs for c in letters]:
        if len(vocab) == vocab_size:
            break
        vocab[left + right] = len(vocab)
        merges.append((left, right))
    if len(vocab) < vocab_size:
        raise ValueError(f"write_full_tokenizer makes at most {len(vocab)} tokens, fewer than vocab_size "
                         f"{vocab_size}; extend its merges (e.g. with letter triples plus one more letter)")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.save(str(path / "tokenizer.json"))
    _write_tokenizer_config(path)


def tokenizer_has_full_vocab(path: Path, vocab_size: int) -> bool:
    """Whether path's tokenizer.json has all vocab_size ids (write_full_tokenizer's), not write_tokenizer's few."""
    file = path / "tokenizer.json"
    if not file.is_file() or not (path / "tokenizer_config.json").is_file():
        return False
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(file)).get_vocab_size(with_added_tokens=True) == vocab_size


def build_checkpoint(name: str, path: Path, seed: int = 0, **overrides):
    """Save a random transformers model of architecture `name` to `path`; return the transformers model.

    A name ending in "-mtp" (deepseek-v3-mtp) adds a random multi-token-prediction module as DeepSeek-V3's
    checkpoints store it: layer num_hidden_layers, with its copies of the embedding and the head."""
    import transformers

    mtp = name.endswith("-mtp")
    class_name, kwargs = ARCHITECTURES[name.removesuffix("-mtp")]
    config = getattr(transformers, class_name)(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if mtp:
        _add_mtp_layer(model)
    _randomize_router_biases(model)
    model.eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path)
    return model


def _randomize_router_biases(model) -> None:
    """V3's e_score_correction_bias starts at zero; give it values so the test sees it being used."""
    generator = torch.Generator().manual_seed(1)
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.rand(buf.shape, generator=generator) * 0.2)


def _add_mtp_layer(model) -> None:
    """Append DeepSeek-V3's MTP module as layer num_hidden_layers (transformers runs only the layers before
    it, so the model's own outputs do not change)."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm

    config = model.config
    config.num_nextn_predict_layers = 1
    layer = DeepseekV3DecoderLayer(config, layer_idx=config.num_hidden_layers)
    hidden = config.hidden_size
    layer.enorm = DeepseekV3RMSNorm(hidden, eps=config.rms_norm_eps)
    layer.hnorm = DeepseekV3RMSNorm(hidden, eps=config.rms_norm_eps)
    layer.eh_proj = torch.nn.Linear(2 * hidden, hidden, bias=False)
    layer.embed_tokens = torch.nn.Embedding(config.vocab_size, hidden)
    layer.shared_head = torch.nn.Module()
    layer.shared_head.norm = DeepseekV3RMSNorm(hidden, eps=config.rms_norm_eps)
    layer.shared_head.head = torch.nn.Linear(hidden, config.vocab_size, bias=False)
    layer.apply(model._init_weights)
    generator = torch.Generator().manual_seed(2)
    for norm in (layer.enorm, layer.hnorm, layer.shared_head.norm):  # not all ones, so a swap would show
        norm.weight.data = 1 + 0.2 * torch.randn(norm.weight.shape, generator=generator)
    with torch.no_grad():  # DeepSeek-V3 stores copies of the shared embedding and head in the layer
        layer.embed_tokens.weight.copy_(model.model.embed_tokens.weight)
        layer.shared_head.head.weight.copy_(model.lm_head.weight)
    model.model.layers.append(layer.float())
