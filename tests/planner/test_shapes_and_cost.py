"""The cost model's pieces against hand-computed figures: parameters, bytes per weight, KV size for
MLA and GQA, FLOPs, collective volumes, memory, and layout checks."""

from __future__ import annotations

import pytest

from shoal.errors import ConfigError, UnsupportedArchitectureError
from shoal.planner.catalog import Chip
from shoal.planner.cost import Deployment, Factors, Layout, all_to_all_copies, check_layout, decode_step_time, \
    forward_cost, memory_per_chip, prefill_time
from shoal.planner.errors import PlanError
from shoal.planner.shapes import load_shape, weight_bytes


def chip(**kw) -> Chip:
    base = dict(key="t", name="test chip", bf16_tflops=100.0, fp8_tflops=200.0, memory_gb=80.0, memory_bw_gbps=1000.0,
                scaleup_gbps=100.0, scaleup_domain=8, scaleout_gbps=10.0, power_w=500.0, price_per_hour=2.0)
    base.update(kw)
    return Chip(**base)


def test_deepseek_v3_parameters_and_mla_kv():
    s = load_shape("deepseek-v3")
    assert (s.layers, s.moe_layers, s.dense_layers) == (61, 58, 3)
    # MLA attention: q_a 7168x1536 + q_b 1536x128x192 + kv_a 7168x576 + kv_b 512x128x256 + o 16384x7168
    assert s.attention_params == 7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 128 * 128 * 7168
    assert s.expert_params == 3 * 7168 * 2048
    assert round(s.total_params / 1e9) == 671  # the model card's 671B
    assert 37e9 < s.active_params < 38e9  # "37B activated"
    # the latent (512) plus the rope key (64) per layer, 2 bytes each in bf16
    assert s.kv_bytes_per_token("bf16") == 61 * 576 * 2 == 70272
    assert s.kv_bytes_per_token("fp8") == 61 * 576


def test_llama_gqa_kv_and_flops():
    s = load_shape("llama-3-70b")
    assert s.kv_bytes_per_token("bf16") == 2 * 80 * 8 * 128 * 2  # keys and values, 8 KV heads of 128
    assert round(s.total_params / 1e9, 1) == 70.6
    # decode: 2 FLOPs per weight touched (embedding lookup excluded, head included) + 4*heads*head_dim per key per layer
    assert s.flops_per_token(1000, absorbed=True) == 2 * (s.active_params - s.embedding_params) + 80 * 1000 * 4 * 64 * 128
    # a causal prefill of 3 tokens attends 1 + 2 + 3 keys
    assert s.prefill_flops(3) == 3 * s.linear_flops_per_token + 80 * 6 * 4 * 64 * 128


def test_bytes_per_weight_and_decode_bytes():
    assert weight_bytes("bf16") == 2 and weight_bytes("int8") == 1
    assert weight_bytes("fp8") == pytest.approx(1 + 4 / 16384)
    assert weight_bytes("int4") == pytest.approx(0.5 + 2 / 128)
    s = load_shape("llama-3-8b")
    linear = s.total_params - 2 * s.embedding_params
    # one decode token reads every linear weight, the bf16 head, and its KV over the context
    assert s.decode_bytes_per_token(100, "int8", "bf16") == pytest.approx(linear * 1 + s.head_params * 2
                                                                          + 100 * 32 * 2 * 8 * 128 * 2)
    assert s.weight_bytes_total("bf16") == pytest.approx(2 * s.total_params)


def test_absorbed_mla_attention_flops():
    s = load_shape("deepseek-v3")
    # decode attends in the latent: scores over 512 + 64, values over 512, per head
    assert s.attention_core_flops_per_key(absorbed=True) == 2 * 128 * 576 + 2 * 128 * 512
    # prefill runs the plain form: 192-dim scores and 128-dim values per head
    assert s.attention_core_flops_per_key(absorbed=False) == 2 * 128 * 192 + 2 * 128 * 128


def test_tensor_parallel_all_reduce_volume():
    s = load_shape("llama-3-8b")
    c = chip(scaleup_gbps=100.0)
    dep = Deployment(c, Layout(4, tp=4), quant="bf16")
    f = Factors(link=1.0)
    cost = forward_cost(s, dep, f, tokens=1000, keys=1000, kv_read_tokens=0, logits_tokens=0, phase="decode")
    # ring all-reduce: each chip sends 2(tp-1)/tp of the activations, spread over its 3 peers... twice a layer
    ring = 2 * 3 / 4 * 1000 * 4096 * 2
    per = ring * 3 / 4 / 100e9 + 5e-6
    assert cost.comm["tp all-reduce"] == pytest.approx(2 * 32 * per)


def test_expert_dispatch_volume_decode_and_prefill_dedup():
    s = load_shape("deepseek-v3")
    c = chip(scaleup_domain=8)
    # decode (latency mode): one copy per remote expert, 8 picks, 15 of 16 chips remote
    copies, share = all_to_all_copies(c, 16, "decode", 8)
    assert copies == pytest.approx(8 * 15 / 16) and share is None
    # prefill over 2 domains: the other domain is hit with probability 1 - (1/2)^8, once
    copies, share = all_to_all_copies(c, 16, "prefill", 8)
    across = 1 - 0.5 ** 8
    inside = 8 * 7 / 16
    assert copies == pytest.approx(across + inside) and share == pytest.approx(across / (across + inside))
    dep = Deployment(c, Layout(16, ep=16), quant="fp8")
    cost = forward_cost(s, dep, Factors(link=1.0), tokens=1600, keys=0, kv_read_tokens=0, logits_tokens=0,
                        phase="decode")
    dispatch = 100 * 8 * 15 / 16 * 7168 * 1.0  # 100 tokens per chip, fp8 dispatch
    in_share = 7 / 15
    t = max(dispatch * in_share / 100e9, dispatch * (1 - in_share) / 10e9) + 15e-6
    assert cost.comm["ep dispatch"] == pytest.approx(58 * t)
    assert cost.comm["ep combine"] == pytest.approx(58 * (max(2 * dispatch * in_share / 100e9,
                                                              2 * dispatch * (1 - in_share) / 10e9) + 15e-6))


def test_memory_bound_decode_matches_hand_roofline():
    s = load_shape("llama-3-8b")
    c = chip(memory_bw_gbps=1000.0, bf16_tflops=1e6)  # compute effectively free
    dep = Deployment(c, Layout(1), quant="bf16")
    f = Factors(memory=1.0, decode_compute=1.0)
    seconds, _ = decode_step_time(s, dep, f, seqs=1, context=1000)
    assert seconds == pytest.approx(s.decode_bytes_per_token(1000, "bf16", "bf16") / 1e12, rel=1e-3)


def test_compute_bound_prefill_matches_hand_roofline():
    s = load_shape("llama-3-8b")
    c = chip(memory_bw_gbps=1e9, bf16_tflops=100.0)
    dep = Deployment(c, Layout(1), quant="bf16")
    seconds, _ = prefill_time(s, dep, Factors(prefill_compute=0.5), prompts=2, prompt_len=512)
    # only the last token of each prompt needs the LM head
    flops = 2 * (s.prefill_flops(512) - 511 * 2 * s.head_params)
    assert seconds == pytest.approx(flops / 50e12, rel=1e-3)


def test_memory_feasibility_counts_weights_and_kv():
    s = load_shape("llama-3-70b")
    c = chip(memory_gb=80.0)
    dep = Deployment(c, Layout(2, tp=2), quant="bf16")
    mem = memory_per_chip(s, dep, seqs=10, context=1000, tokens_in_flight=0)
    assert mem.weights == pytest.approx(s.weight_bytes_total("bf16") / 2, rel=1e-6)
    assert mem.kv == pytest.approx(10 * 1000 * s.kv_bytes_per_token("bf16") / 2)
    assert not mem.fits  # 70B in bf16 is 141 GB: 70.6 GB per chip leaves no room within 90% of 80 GB with 16 GB KV


def test_layouts_that_do_not_divide_the_model_are_refused():
    llama = load_shape("llama-3-8b")
    deepseek = load_shape("deepseek-v3")
    with pytest.raises(PlanError, match="tp=3 does not divide the model's 32 attention heads"):
        check_layout(llama, Layout(3, tp=3))
    with pytest.raises(PlanError, match="ep=3 does not divide the model's 256 experts"):
        check_layout(deepseek, Layout(3, ep=3))
    with pytest.raises(PlanError, match="no routed experts"):
        check_layout(llama, Layout(2, ep=2))
    check_layout(deepseek, Layout(288, ep=288, redundant_experts=32))


def test_config_errors_surface(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["MambaForCausalLM"], "hidden_size": 8, '
                                          '"num_attention_heads": 1, "vocab_size": 8, "num_hidden_layers": 1}')
    with pytest.raises(UnsupportedArchitectureError, match="MambaForCausalLM"):
        load_shape(tmp_path)
    with pytest.raises(ConfigError, match="no model config"):
        load_shape(tmp_path / "missing")


def test_expert_overhead_counts_touched_experts_per_phase():
    """Each routed expert that receives a token costs a fixed time per MoE layer, prefill and decode apart."""
    s = load_shape("deepseek-v3")  # 58 MoE layers, 256 routed experts, 8 per token
    dep = Deployment(chip(), Layout(1), quant="bf16", overlap=False)
    base = Factors()
    f = Factors(prefill_expert_us=100.0, decode_expert_us=10.0)

    def overhead(factors, tokens, phase):
        return forward_cost(s, dep, factors, tokens=tokens, keys=0, kv_read_tokens=0, logits_tokens=0,
                            phase=phase).overhead_s

    # one token touches exactly its 8 experts: 58 layers x 8 x 10 us in decode
    assert overhead(f, 1, "decode") - overhead(base, 1, "decode") == pytest.approx(58 * 8 * 10e-6)
    # 64 tokens touch 256 x (1 - (1 - 8/256)^64) experts on average, each 100 us in prefill
    touched = 256 * (1 - (1 - 8 / 256) ** 64)
    assert overhead(f, 64, "prefill") - overhead(base, 64, "prefill") == pytest.approx(58 * touched * 100e-6)
    # a dense model has no experts to pay for
    llama = load_shape("llama-3-8b")
    assert forward_cost(llama, dep, f, 64, 0, 0, 0, "prefill").overhead_s == 0.0


def test_activation_passes_are_timed_at_the_memory_roofline():
    """passes x hidden x 2 bytes per token per layer, read or written at bandwidth x memory efficiency."""
    s = load_shape("llama-3-8b")  # 32 layers, hidden 4096
    dep = Deployment(chip(memory_bw_gbps=1000.0), Layout(1), quant="bf16", overlap=False)
    f = Factors(activation_passes=10.0, memory=0.5)
    cost = forward_cost(s, dep, f, tokens=2048, keys=0, kv_read_tokens=0, logits_tokens=0, phase="prefill")
    assert cost.pieces["activations"] == pytest.approx(32 * 2048 * 10 * 4096 * 2 / (1000e9 * 0.5))
    assert cost.bound["activations"] == "memory"
    # off by default: the published-deployment fits do not see it
    assert "activations" not in forward_cost(s, dep, Factors(), 2048, 0, 0, 0, "prefill").pieces


def test_a_chunked_step_splits_attention_and_blends_efficiency():
    """A mixed step: prompt keys in MLA's plain form, decode keys absorbed; matmuls at the two phases'
    efficiencies weighted by their tokens, or, with matmul_half_tokens, by their rows."""
    s = load_shape("deepseek-v3")
    dep = Deployment(chip(memory_bw_gbps=1e9), Layout(1), quant="bf16", overlap=False)
    f = Factors(prefill_compute=0.6, decode_compute=0.2)
    cost = forward_cost(s, dep, f, tokens=400, keys=1000, kv_read_tokens=0, logits_tokens=0, phase="mixed",
                        prefill_tokens=100, prefill_keys=300)
    core = (300 * s.attention_core_flops_per_key(absorbed=False) + 700 * s.attention_core_flops_per_key(absorbed=True))
    eff = 0.25 * 0.6 + 0.75 * 0.2
    assert cost.pieces["attention core"] == pytest.approx(61 * core / (100e12 * eff))
    by_rows = forward_cost(s, dep, f.replaced(matmul_half_tokens=100.0), 400, 1000, 0, 0, "mixed", 100, 300)
    assert by_rows.pieces["attention core"] == pytest.approx(61 * core / (100e12 * 0.6 * 400 / 500))
    # a routed expert's rows are the tokens it receives: 400 x 8 / 256
    rows = 400 * 8 / 256
    flops = 400 * 8 * 2 * s.expert_params
    assert by_rows.pieces["routed experts"] == pytest.approx(58 * flops / (100e12 * 0.6 * rows / (rows + 100)))


def test_calibrated_chips_keep_their_per_phase_efficiencies():
    from shoal.planner.validate import factors_for, published_fit

    mine = chip(family="this", efficiency={"prefill_compute": 0.3, "decode_compute": 0.1})
    got = factors_for(mine, published_fit())
    assert (got.prefill_compute, got.decode_compute, got.matmul_half_tokens) == (0.3, 0.1, 0.0)
    assert factors_for(chip(family="nvidia"), published_fit()).matmul_half_tokens > 0
