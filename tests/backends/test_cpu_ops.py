"""shoal's fused CPU decode operations (shoal/backends/cpu/csrc/fused.c) against the torch code they replace."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from shoal.backends.cpu import fused as cpu_ops
from shoal.backends.cpu.ops import CpuOps
from shoal.backends.ops import REFERENCE
from shoal.layers.kv_cache import ContiguousKVCache
from shoal.layers.norm import RMSNorm
from shoal.layers.rotary import RotaryEmbedding
from shoal.models.hf_config import RopeConfig


# Layers built here, outside a model, call the CPU backend's ops (tests/backends/conftest.py).
pytestmark = [
    pytest.mark.skipif(not cpu_ops.available(), reason="no C compiler here: the operations are not built"),
    pytest.mark.usefixtures("cpu_ops_bound"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1024), (3, 5, 72), (1, 40, 4096)])
def test_rms_norm_with_and_without_the_residual(dtype, shape):
    g = torch.Generator().manual_seed(shape[-1])
    x, r = (torch.randn(*shape, generator=g) * 3).to(dtype), torch.randn(*shape, generator=g).to(dtype)
    norm = RMSNorm(shape[-1], 1e-5).to(dtype)
    norm.weight.data.copy_(torch.randn(shape[-1], generator=g) * 0.2 + 1)
    out, summed = cpu_ops.rms_norm(x, norm.weight, norm.eps, r)
    assert torch.equal(summed, x + r)
    ref = REFERENCE.rms_norm(x + r, norm.weight, norm.eps)
    if dtype == torch.bfloat16:  # rounded where torch rounds: the same values, but for a rare last-bit flip
        assert (out != ref).float().mean().item() < 0.01  # (the mean of squares sums in another order)
        torch.testing.assert_close(out, ref)
    else:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    alone, none = cpu_ops.rms_norm(x, norm.weight, norm.eps)
    assert none is None
    torch.testing.assert_close(alone, REFERENCE.rms_norm(x, norm.weight, norm.eps))
    # and the module takes the fused path with the same result
    fused, fused_sum = norm(x, residual=r)
    assert torch.equal(fused, out) and torch.equal(fused_sum, summed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(7, 2 * 2816, generator=g) * 4).to(dtype)
    gate, up = x.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    out = cpu_ops.silu_mul(x)
    if dtype == torch.bfloat16:
        assert torch.equal(out, ref)
    else:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def _reference(q, k_pool, v_pool, slots, lens, positions, heads, kv_heads, dim, scale, window):
    """Per sequence: float64 softmax attention over its context (the torch path's mask semantics)."""
    outs = []
    for s in range(q.shape[0]):
        n = min(int(lens[s]), int(positions[s]) + 1)
        first = max(0, int(positions[s]) + 1 - window) if window else 0
        keys = k_pool[slots[s, first:n]].double().transpose(0, 1)  # [kv_heads, keys, dim]
        values = v_pool[slots[s, first:n]].double().transpose(0, 1)
        qs = q[s].double().view(heads, 1, dim)
        out = F.scaled_dot_product_attention(qs[None], keys[None], values[None], scale=scale, enable_gqa=True)
        outs.append(out[0].reshape(-1))
    return torch.stack(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim", [(16, 16, 64), (8, 2, 32), (4, 1, 24)])
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_attention_writes_the_cache_and_attends(dtype, heads, kv_heads, dim, window, threads):
    g = torch.Generator().manual_seed(heads * 100 + dim)
    lens = torch.tensor([13, 1, 40])  # three sequences, one new token each, scattered slots
    seqs, longest = len(lens), int(lens.max())
    perm = torch.randperm(200, generator=g)
    slots = perm[: seqs * longest].view(seqs, longest).clone()
    positions = lens - 1
    k_pool = torch.randn(201, kv_heads, dim, generator=g).to(dtype)
    v_pool = torch.randn(201, kv_heads, dim, generator=g).to(dtype)
    qkv = (torch.randn(seqs, (heads + 2 * kv_heads) * dim, generator=g) * 2).to(dtype)
    q, k, v = qkv[:, : heads * dim], qkv[:, heads * dim : (heads + kv_heads) * dim], qkv[:, (heads + kv_heads) * dim :]
    rotary = RotaryEmbedding(RopeConfig(theta=10000.0), dim, 64)
    cos_sin = rotary.tables(int(positions.max()) + 1)
    write = slots[torch.arange(seqs), positions]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fused = cpu_ops.DecodeAttention(positions[None], write, slots, lens, window or None, dtype)
        k_ours, v_ours = k_pool.clone(), v_pool.clone()
        out = fused(q, k, v, heads, kv_heads, dim, k_ours, v_ours, dim**-0.5, cos_sin)
    finally:
        torch.set_num_threads(previous)
    # the cache holds the rotated keys (rotated exactly as RotaryEmbedding does) and the values
    k_rot = rotary(k.view(1, seqs, kv_heads, dim), positions[None])[0]
    q_rot = rotary(q.view(1, seqs, heads, dim), positions[None])[0].reshape(seqs, -1)
    k_pool[write], v_pool[write] = k_rot, v.view(seqs, kv_heads, dim)
    assert torch.equal(k_ours, k_pool) and torch.equal(v_ours, v_pool)
    ref = _reference(q_rot, k_pool, v_pool, slots, lens, positions, heads, kv_heads, dim, dim**-0.5, window)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


def test_contiguous_cache_offers_the_fused_decode_only_for_one_token_steps():
    cache = ContiguousKVCache(2, 3, 32, [(2, 8), (2, 8)], torch.bfloat16, "cpu", CpuOps())
    cache.begin_forward(torch.tensor([[0, 1, 2]] * 3), None)
    assert cache.decode_attention() is None
    cache.begin_forward(torch.tensor([[3], [3], [3]]), None)
    fused = cache.decode_attention()
    assert fused is not None and fused.seqs == 3
    assert fused.slot_mapping.tolist() == [3, 35, 67]
    assert cache.pools(0)[0].shape == (96, 2, 8)


def _mla_layer(dtype, heads, nope, rope, rank, v_dim, interleaved, seed):
    from shoal.backends import get_backend
    from shoal.models.deepseek import MultiHeadLatentAttention
    from shoal.models.hf_config import parse_model_config

    raw = dict(hidden_size=96, num_attention_heads=heads, kv_lora_rank=rank, qk_nope_head_dim=nope,
               qk_rope_head_dim=rope, v_head_dim=v_dim, rms_norm_eps=1e-6, num_hidden_layers=1, vocab_size=10,
               intermediate_size=8, max_position_embeddings=64, rope_theta=10000.0,
               architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2")
    config = parse_model_config(raw)
    rotary = RotaryEmbedding(RopeConfig(theta=10000.0), rope, 64, interleaved=interleaved)
    layer = MultiHeadLatentAttention(config, 0, get_backend("cpu"), rotary)
    g = torch.Generator().manual_seed(seed)
    for p in layer.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    layer.kv_a_layernorm.weight.data.copy_(torch.rand(rank, generator=g) + 0.5)
    return layer.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,nope,rope,rank,v_dim", [(16, 64, 32, 256, 64), (3, 16, 8, 40, 24), (2, 0, 4, 16, 8)])
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("lens", [[13, 1, 40], [37]])
def test_mla_decode_attention_against_the_torch_path(dtype, heads, nope, rope, rank, v_dim, interleaved, threads, lens):
    """The fused MLA decode (latent norm, rotary, cache write, absorption, attention) against the layer's
    own torch code (the absorbed form over the gathered cache): three sequences at scattered slots (threads
    split the sequences), or one (threads split its heads)."""
    layer = _mla_layer(dtype, heads, nope, rope, rank, v_dim, interleaved, heads * 10 + rank)
    g = torch.Generator().manual_seed(rank)
    lens = torch.tensor(lens)
    seqs, longest = len(lens), int(lens.max())
    slots = torch.randperm(200, generator=g)[: seqs * longest].view(seqs, longest).clone()
    positions = lens - 1
    pool = (torch.randn(201, rank + rope, generator=g)).to(dtype)
    q = (torch.randn(seqs, heads * (nope + rope), generator=g) * 2).to(dtype)
    kv = (torch.randn(seqs, rank + rope + 5, generator=g) * 2).to(dtype)[:, : rank + rope]  # strided rows
    write = slots[torch.arange(seqs), positions]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fused = cpu_ops.DecodeAttention(positions[None], write, slots, lens, None, dtype)
        ours_pool = pool.clone()
        out = fused.mla(q, kv, layer.kv_a_layernorm.weight, layer.kv_a_layernorm.eps,
                        layer.kv_b_proj.weight.contiguous(), heads, nope, rope, rank, v_dim, ours_pool, layer.scale,
                        layer.rotary.tables(int(positions.max()) + 1), interleaved)
    finally:
        torch.set_num_threads(previous)
    # the cache: the normed latent and the rotated key, as the torch path writes them
    latent = layer.kv_a_layernorm(kv[:, :rank].contiguous())
    k_rope = layer.rotary(kv[None, :, None, rank:], positions[None])[0, :, 0]
    pool[write] = torch.cat([latent, k_rope], dim=-1)
    torch.testing.assert_close(ours_pool, pool, rtol=0, atol=0 if dtype == torch.float32 else 1e-2)
    # attention, in float64 from the same cache
    q_ = q.view(seqs, heads, nope + rope)
    q_rope = layer.rotary(q_[None, :, :, nope:], positions[None])[0]
    w = layer.kv_b_proj.weight.double().view(heads, nope + v_dim, rank)
    refs = []
    for s in range(seqs):
        ctx = pool[slots[s, : int(lens[s])]].double()  # [keys, rank + rope]
        q_lat = torch.einsum("hd,hdr->hr", q_[s, :, :nope].double(), w[:, :nope]).to(dtype).double()
        scores = (q_lat @ ctx[:, :rank].T + q_rope[s].double() @ ctx[:, rank:].T) * layer.scale
        o = scores.softmax(-1) @ ctx[:, :rank]
        refs.append(torch.einsum("hr,hvr->hv", o, w[:, nope:]).reshape(-1))
    ref = torch.stack(refs)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols", [1, 5, 16, 17, 32003])
def test_argmax_rows_is_torch_max_indices_with_its_ties_and_nan(dtype, cols):
    x = torch.randn(8, cols).to(dtype)
    x[1] = 0.0  # all tied: the first
    x[2, cols // 2] = float("nan")  # NaN ranks above every number
    x[3] = float("-inf")
    x[4, -1] = 100.0  # the maximum in the scalar tail
    x[5, ::3] = 50.0  # a tie of many: the first
    x[6, 0] = float("nan")
    assert torch.equal(cpu_ops.argmax_rows(x), x.max(dim=-1).indices)
    assert torch.equal(cpu_ops.argmax_rows(x[:, : max(cols // 2, 1)]), x[:, : max(cols // 2, 1)].max(dim=-1).indices)
    assert cpu_ops.argmax_rows(x[0]) is None  # 1-D: the caller keeps torch


@pytest.mark.parametrize("tokens", [0, 1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("scoring", "bias", "norm", "scaling"), [
    ("softmax", False, False, 1.0), ("softmax", False, True, 1.0), ("softmax", False, False, 2.5),
    ("sigmoid", True, True, 2.5), ("sigmoid", False, False, 1.0),
])
def test_moe_route_matches_the_torch_router(tokens, dtype, scoring, bias, norm, scaling):
    """The C router (Router.forward on the CPU) against Router's torch code: the same experts, weights equal
    up to float32 summation order, and the choices counted."""
    from shoal.layers.moe import Router, RouterConfig

    torch.manual_seed(0)
    cfg = RouterConfig(num_experts=24, top_k=6, scoring=scoring, norm_topk_prob=norm, routed_scaling_factor=scaling,
                       correction_bias=bias)
    router = Router(72, cfg)
    router.weight.data.normal_(0, 0.3)
    if bias:
        router.e_score_correction_bias.data.normal_(0, 0.2)
    x = torch.randn(tokens, 72).to(dtype)
    load = torch.zeros(24, dtype=torch.long)
    weights, ids = router(x, load)
    ref_weights, ref_ids = router._route(x)
    order, ref_order = ids.sort(dim=-1), ref_ids.sort(dim=-1)
    assert torch.equal(order.values, ref_order.values)
    torch.testing.assert_close(weights.gather(1, order.indices), ref_weights.gather(1, ref_order.indices),
                               rtol=1e-5, atol=1e-6)
    assert torch.equal(load, torch.bincount(ids.flatten(), minlength=24))
