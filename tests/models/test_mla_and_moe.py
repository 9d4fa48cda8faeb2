"""DeepSeek specifics: the cache holds MLA's compressed latent, absorbed decode equals expanded attention,
and the dense / MoE layer layout follows first_k_dense_replace and moe_layer_freq."""

from __future__ import annotations

import pytest
import torch

from shoal.backends import get_backend
from shoal.layers.moe import MoE
from shoal.loader import build_model
from shoal.models.deepseek import is_moe_layer
from shoal.models.hf_config import load_model_config, parse_model_config


def load(path):
    model, config, _ = build_model(path, get_backend("cpu"), torch.device("cpu"), torch.float32, progress=False)
    return model, config


def test_cache_stores_the_compressed_latent(checkpoint):
    path, _ = checkpoint("deepseek-v3")
    model, config = load(path)
    latent = config.get("kv_lora_rank") + config.get("qk_rope_head_dim")
    cache = model.make_cache(1, 16, torch.float32, "cpu")
    assert [tuple(t.shape) for t in cache.layers[0]] == [(1, 16, latent)]
    full_kv = 2 * config.num_attention_heads * (config.get("qk_nope_head_dim") + config.get("qk_rope_head_dim"))
    assert cache.bytes_per_token() == config.num_hidden_layers * latent * 4
    assert cache.bytes_per_token() < config.num_hidden_layers * full_kv * 4 / 4


@pytest.mark.parametrize("fused", [True, False])
def test_absorbed_decode_equals_expanded_attention(checkpoint, fused):
    path, _ = checkpoint("deepseek-v2-lite")
    model, _ = load(path)
    for layer in model.model.layers:  # False: the torch code (what runs off the CPU or without the C kernels)
        layer.self_attn.fusable = fused
    ids = torch.randint(2, 300, (1, 20), generator=torch.Generator().manual_seed(5))
    # one prefill of all 20 tokens (expanded form) ...
    cache = model.make_cache(1, 20, torch.float32, "cpu")
    with torch.no_grad():
        expanded = model(ids, torch.arange(20)[None], cache)[0, -1]
    # ... against a prefill of 19 and a decode step for the last one (absorbed form)
    cache = model.make_cache(1, 20, torch.float32, "cpu")
    with torch.no_grad():
        model(ids[:, :19], torch.arange(19)[None], cache)
        absorbed = model(ids[:, 19:], torch.tensor([[19]]), cache)[0, -1]
    assert (expanded - absorbed).abs().max() < 1e-4


def test_dense_and_moe_layer_layout(checkpoint, tmp_path):
    path, _ = checkpoint("deepseek-v3")
    raw = dict(load_model_config(path).raw, num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2)
    config = parse_model_config(raw)
    assert [is_moe_layer(config, i) for i in range(6)] == [False, False, True, False, True, False]
    model, _ = load(path)  # first_k_dense_replace=1, moe_layer_freq=1 in the checkpoint
    kinds = [isinstance(layer.mlp, MoE) for layer in model.model.layers]
    assert kinds == [False, True, True]
    moe = model.model.layers[1].mlp
    assert moe.gate.cfg.scoring == "sigmoid" and moe.gate.cfg.topk_method == "noaux_tc"
    assert moe.shared_experts is not None


def _batched(experts, x, weights, expert_ids):
    """The batched path's result for each row of x, one row at a time (the lone-token path bypassed)."""
    from shoal.layers.moe import tokens_by_expert

    out = torch.zeros_like(x)
    for expert, tokens, token_weights in tokens_by_expert(weights, expert_ids, experts.num_experts):
        out.index_add_(0, tokens, (experts._expert(x[tokens], expert) * token_weights[:, None]).to(x.dtype))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant", [None, "int4", "int8"])
@pytest.mark.parametrize("tokens", [1, 2, 24])
def test_token_by_token_experts_equal_the_batched_path(checkpoint, dtype, quant, tokens):
    """A decode step (one token, or a few whose choices do not outnumber the experts: a verified draft)
    runs each token's experts straight on its row; more tokens run grouped by expert in one C call. The
    sums equal the grouped torch path's — bit for bit where both multiply with the same kernel (float32:
    MKL's packed sgemm; up to 8 rows per expert: gemv), else within bf16 rounding."""
    path, _ = checkpoint("deepseek-v2-lite")
    model, _, _ = build_model(path, get_backend("cpu"), torch.device("cpu"), dtype, progress=False, quant=quant,
                              quant_group_size=32 if quant == "int4" else None)
    moe = next(layer.mlp for layer in model.model.layers if isinstance(layer.mlp, MoE))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(tokens, moe.gate.weight.shape[1], generator=g).to(dtype)
    weights, expert_ids = moe.gate(x)
    with torch.no_grad():
        by_token = moe.experts(x, weights, expert_ids)
        batched = _batched(moe.experts, x, weights, expert_ids)
    from shoal.backends.cpu import gemv

    most_rows = int(torch.bincount(expert_ids.flatten()).max())
    if (dtype == torch.float32 and quant is None) or most_rows <= 8:
        assert torch.equal(by_token, batched)
    else:  # the grouped torch path multiplies many rows with another kernel (oneDNN, a dequantized matmul)
        torch.testing.assert_close(by_token.float(), batched.float(), rtol=0.05, atol=0.05)
    if dtype == torch.bfloat16 and (most_rows <= 8 or not gemv.rows_kernels_available()):
        # bf16 rows through gemv (8 a call, activations quantized per row): each token's bits as when alone.
        # (float32's MKL sgemm and float-activation gemv may sum differently for another row count.)
        with torch.no_grad():
            alone = torch.cat([moe.experts(x[i : i + 1], weights[i : i + 1], expert_ids[i : i + 1])
                               for i in range(tokens)])
        assert torch.equal(by_token, alone)
    load = moe.expert_load.clone()
    with torch.no_grad():
        moe(x[None])
    assert (moe.expert_load - load).sum() == expert_ids.numel()
    if tokens == 1:
        assert ((moe.expert_load - load)[expert_ids[0]] == 1).all()
