"""Qwen3-MoE, Qwen2-MoE and Mixtral: the Llama family with the shared MoE block. Where each family's layers
go (dense and sparse, the gated shared expert), what config.moe reads from each spelling, checkpoint
names in the family's own spelling, and int8 / int4 against transformers running the same quantized
weights (float32 logits within 1e-4, 32 identical greedy tokens)."""

from __future__ import annotations

import copy

import pytest
import torch

from shoal import LLM, SamplingParams
from shoal.backends import get_backend
from shoal.errors import WeightError
from shoal.layers.mlp import GatedMLP
from shoal.layers.moe import MoE
from shoal.loader import build_model
from shoal.models.hf_config import parse_model_config
from shoal.quant.formats import Int4GroupWeight, Int8ChannelWeight

FAMILIES = ("qwen3-moe", "qwen2-moe", "mixtral")
PROMPT_LEN, NEW_TOKENS = 64, 32


def load(path, **options):
    model, _, _ = build_model(path, get_backend("cpu"), torch.device("cpu"), torch.float32, progress=False, **options)
    return model


def test_layers_follow_each_familys_config(checkpoint):
    qwen3 = load(checkpoint("qwen3-moe")[0])  # mlp_only_layers=[0]
    assert [type(layer.mlp) for layer in qwen3.model.layers] == [GatedMLP, MoE]
    moe = qwen3.model.layers[1].mlp
    assert moe.shared_experts is None and moe.gate.cfg.norm_topk_prob and moe.gate.cfg.scoring == "softmax"
    assert qwen3.model.layers[0].self_attn.qk_norm

    qwen2 = load(checkpoint("qwen2-moe")[0])
    moe = qwen2.model.layers[0].mlp
    assert isinstance(moe, MoE) and moe.shared_expert_gate is not None and not moe.gate.cfg.norm_topk_prob
    assert moe.shared_experts.down_proj.in_features == 64  # shared_expert_intermediate_size
    assert qwen2.model.layers[0].self_attn.qkv_proj.bias is not None

    mixtral = load(checkpoint("mixtral")[0])
    moe = mixtral.model.layers[1].mlp
    assert isinstance(moe, MoE) and moe.gate.cfg.norm_topk_prob and moe.gate.cfg.num_experts == 4
    assert moe.experts.intermediate_size == 128  # Mixtral's experts are the dense MLP's size


def _raw(**fields):
    return dict(architectures=["X"], vocab_size=8, hidden_size=8, num_attention_heads=2, num_hidden_layers=4,
                intermediate_size=32, **fields)


def test_moe_config_reads_every_spelling():
    qwen = parse_model_config(_raw(model_type="qwen3_moe", num_experts=16, num_experts_per_tok=4,
                                   moe_intermediate_size=8, decoder_sparse_step=2, mlp_only_layers=[3])).moe
    assert (qwen.num_experts, qwen.experts_per_token, qwen.intermediate_size) == (16, 4, 8)
    assert qwen.layers == (False, True, False, False) and qwen.shared_intermediate_size == 0
    # transformers 5 writes Qwen3-MoE's expert count as num_local_experts
    assert parse_model_config(_raw(num_local_experts=6, num_experts_per_tok=2, moe_intermediate_size=8,
                                   decoder_sparse_step=1)).moe.num_experts == 6
    shared = parse_model_config(_raw(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                                     shared_expert_intermediate_size=24)).moe
    assert shared.shared_intermediate_size == 24 and all(shared.layers)
    mixtral = parse_model_config(_raw(num_local_experts=8, num_experts_per_tok=2)).moe
    assert (mixtral.intermediate_size, mixtral.num_moe_layers) == (32, 4)
    deepseek = parse_model_config(_raw(n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2,
                                       moe_intermediate_size=8, first_k_dense_replace=1)).moe
    assert deepseek.layers == (False, True, True, True) and deepseek.shared_intermediate_size == 16
    assert parse_model_config(_raw()).moe is None
    from shoal.errors import ConfigError

    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        parse_model_config(_raw(num_local_experts=2, num_experts_per_tok=3))


def test_missing_weights_are_named_as_the_checkpoint_names_them(checkpoint, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    src = checkpoint("mixtral")[0]
    shutil.copytree(src, tmp_path / "m")
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(WeightError, match=r"model\.layers\.1\.block_sparse_moe\.experts\.2\.w3\.weight"):
        load(tmp_path / "m")


def _fake_quantized(reference, quant: str):
    """transformers' model with the weights shoal quantizes replaced by their quantized values: every
    matrix of the decoder layers (int8 per row, or int4 in groups of 32 inputs; transformers holds each
    layer's experts as one [experts, out, in] tensor) but the router and Qwen2-MoE's one-row shared-expert
    gate, and the embedding table and head int8 per row."""
    model = copy.deepcopy(reference)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2 or name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight",
                                               "shared_expert_gate.weight")):
                continue
            if quant == "int4" and "embed_tokens" not in name and "lm_head" not in name:
                p.copy_(Int4GroupWeight.quantize(p, 32).dequantize())
            else:
                p.copy_(Int8ChannelWeight.quantize(p).dequantize())
    return model


@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("name", FAMILIES)
def test_quantized_matches_transformers_on_the_same_weights(checkpoint, name, quant):
    path, reference = checkpoint(name)
    reference = _fake_quantized(reference, quant)
    ids = torch.randint(2, 300, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_logits = reference(ids).logits[0]
        ref_tokens = reference.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                        do_sample=False)[0, PROMPT_LEN:].tolist()
    options = dict(quant=quant, quant_group_size=32 if quant == "int4" else None)
    model = load(path, **options)
    cache = model.make_cache(1, PROMPT_LEN, torch.float32, "cpu")
    with torch.no_grad():
        logits = model.compute_logits(model(ids, torch.arange(PROMPT_LEN)[None], cache))[0]
    assert (logits - ref_logits).abs().max().item() < 1e-4
    assert (logits - reference.__class__.from_pretrained(path, dtype=torch.float32)(ids).logits[0]).abs().max() > 1e-4

    llm = LLM(str(path), device="cpu", dtype="float32", progress=False, **options)
    out = llm.generate(ids[0].tolist(), SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))[0]
    assert out.token_ids == ref_tokens
