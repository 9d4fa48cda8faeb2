"""The one-call CPU decode step (shoal/backends/cpu/csrc/decode.c) against the layer-by-layer path it
replaces: the same kernels in the same order, so the same tokens and the same log-probabilities, bit for
bit, for plain, quantized, biased and sliding-window Llama-family models and mixed batches."""

from __future__ import annotations

import pytest
import torch

from checkpoints import build_checkpoint
from shoal import LLM, SamplingParams
from shoal.backends.cpu import decode as cpu_decode, packed_f32 as cpu_packed_f32

pytestmark = pytest.mark.skipif(cpu_decode.library() is None, reason="no C compiler here: the kernels are not built")

# Wide enough for every kernel: int4's 128-input blocks, int8's 16.
SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3)


# DeepSeek: every projection's input a multiple of 128 too (v_head_dim 32 for o_proj, q_lora_rank 128).
MOE_SHAPE = dict(hidden_size=128, moe_intermediate_size=128, intermediate_size=256, num_hidden_layers=2, v_head_dim=32)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """built(name) -> a checkpoint folder of that architecture in the kernels' shapes, built once."""
    paths = {}

    def get(name: str):
        if name not in paths:
            paths[name] = tmp_path_factory.mktemp(name)
            if name == "deepseek-v2-lite":
                shape = MOE_SHAPE
            elif name.startswith("deepseek"):
                shape = dict(MOE_SHAPE, q_lora_rank=128)
            else:
                shape = SHAPE
            build_checkpoint(name, paths[name], **shape)
        return paths[name]

    return get


def generate(llm: LLM, fused: bool):
    llm.engine.model._cpu_decode = None if fused else False  # None: described again at the next step
    # 11 prompts: with max_num_seqs 8 steps of 8 rows, then of 3 (matrix-vector kernels); with 16, steps
    # of 11 (the batched kernels, where this CPU has them); mistral's window (24) is passed.
    prompts = [[(7 * i + 3 * j) % 250 + 3 for j in range(4 + 3 * i)] for i in range(11)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)
    outs = llm.generate(prompts, params)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


@pytest.mark.parametrize("max_seqs", [8, 16])
@pytest.mark.parametrize("quant", [None, "int8", "int4"])
@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral"])
def test_one_call_decode_equals_the_layers(built, name, quant, max_seqs, monkeypatch):
    llm = LLM(str(built(name)), dtype="bfloat16", progress=False, max_model_len=128, max_num_seqs=max_seqs,
              quant=quant, quant_group_size=32, kv_cache_memory=8 << 20, enable_prefix_caching=False)
    rows, run = [], cpu_decode.LlamaDecode.run
    monkeypatch.setattr(cpu_decode.LlamaDecode, "run", lambda self, x, *a: rows.append(x.numel() // x.shape[-1])
                        or run(self, x, *a))
    fused = generate(llm, True)
    assert isinstance(llm.engine.model._cpu_decode, cpu_decode.LlamaDecode)  # the one-call step ran...
    # ...on every step it takes: steps of 11 rows where this CPU's batched kernels take 11 (else none of
    # them: with max_num_seqs 16 every step has 11), steps of 8 and 3 with max_num_seqs 8
    batched = cpu_decode.batched_rows(torch.bfloat16, quant is None) >= 11
    assert max(rows, default=0) == (8 if max_seqs == 8 else 11 if batched else 0)
    layered = generate(llm, False)
    assert fused == layered


@pytest.mark.skipif(not cpu_packed_f32.available(), reason="this torch has no MKL packed sgemm")
@pytest.mark.parametrize("max_seqs", [8, 16])
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_float32_one_call_decode_equals_the_layers(built, name, max_seqs, monkeypatch):
    """float32 weights packed for MKL: the call multiplies with the same packed copies, any row count."""
    # No prefix cache: a second run would prefill fewer rows, and a matmul's rows need not be the same
    # bits at another row count (MKL's AVX2 sgemm, for one), which would hide what is compared here.
    llm = LLM(str(built(name)), dtype="float32", progress=False, max_model_len=128, max_num_seqs=max_seqs,
              kv_cache_memory=8 << 20, enable_prefix_caching=False)
    rows, run = [], cpu_decode.LlamaDecode.run
    monkeypatch.setattr(cpu_decode.LlamaDecode, "run", lambda self, x, *a: rows.append(x.numel() // x.shape[-1])
                        or run(self, x, *a))
    fused = generate(llm, True)
    assert isinstance(llm.engine.model._cpu_decode, cpu_decode.LlamaDecode) and max(rows) == min(max_seqs, 11)
    assert fused == generate(llm, False)
    alone = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)
    outs = []
    for fused_step in (True, False):  # one sequence: one-row multiplies
        llm.engine.model._cpu_decode = None if fused_step else False
        outs.append([(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate([[61, 2, 90]], alone)])
    assert outs[0] == outs[1] and 1 in rows
    # a weight changed in place after packing: its copy is stale, so the layers (multiplying the weight) run
    rows.clear()
    llm.engine.model._cpu_decode = None
    with torch.no_grad():
        llm.engine.model.model.layers[0].mlp.down_proj.weight.mul_(1.0)
    llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3))
    assert not rows


def test_models_it_cannot_run_keep_their_layers(built, monkeypatch):
    # Qwen3's per-head norms and unpacked float32 weights are not what the step runs: the layers do, as before.
    qwen3 = LLM(str(built("qwen3")), dtype="bfloat16", progress=False, max_model_len=64, kv_cache_memory=4 << 20)
    qwen3.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3))
    assert qwen3.engine.model._cpu_decode is False
    monkeypatch.setenv(cpu_packed_f32.ENV_SWITCH, "0")
    cpu_packed_f32.available.cache_clear()
    try:
        fp32 = LLM(str(built("llama")), dtype="float32", progress=False, max_model_len=64, kv_cache_memory=4 << 20)
        fp32.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3))
        assert fp32.engine.model._cpu_decode is False
    finally:
        monkeypatch.delenv(cpu_packed_f32.ENV_SWITCH)
        cpu_packed_f32.available.cache_clear()


def test_switched_off(built, monkeypatch):
    monkeypatch.setenv("SHOAL_CPU_DECODE", "0")
    cpu_decode.library.cache_clear()
    try:
        assert cpu_decode.library() is None
        llm = LLM(str(built("llama")), dtype="bfloat16", progress=False, max_model_len=64, kv_cache_memory=4 << 20)
        out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3))
        assert len(out[0].outputs[0].token_ids) == 3 and llm.engine.model._cpu_decode is False
    finally:
        monkeypatch.delenv("SHOAL_CPU_DECODE")
        cpu_decode.library.cache_clear()
    assert torch.get_num_threads() >= 1 and cpu_decode.library() is not None


# ---- DeepSeek: two calls per layer (cpu_decode.DeepseekDecode), a lone token's experts in one --------
@pytest.mark.parametrize(("name", "quant"), [
    ("deepseek-v2-lite", None), ("deepseek-v2-lite", "int4"), ("deepseek-v2-grouped", "int8"), ("deepseek-v3", "int4"),
])
def test_deepseek_calls_equal_the_layers(built, name, quant):
    llm = LLM(str(built(name)), dtype="bfloat16", progress=False, max_model_len=64, max_num_seqs=8,
              quant=quant, quant_group_size=32, kv_cache_memory=4 << 20, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3)
    model = llm.engine.model
    stacks = [m for m in model.modules() if hasattr(m, "_one_call")]

    def run(fused: bool):
        model._cpu_decode = None if fused else False
        for m in stacks:
            m._one_call = None if fused else False
        # three sequences at once (the MoE layers' torch path between the calls), then one alone (one call)
        together = llm.generate([[5, 9, 11, 40, 7], [100, 3, 3, 8], [17] * 9], params)
        alone = llm.generate([[61, 2, 90]], params)
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in together + alone]

    loads = [m.expert_load for m in model.modules() if hasattr(m, "expert_load")]
    before = [load.clone() for load in loads]
    fused = run(True)
    assert isinstance(model._cpu_decode, cpu_decode.DeepseekDecode)  # the calls ran
    assert stacks and all(isinstance(m._one_call, cpu_decode.TokenExperts) for m in stacks)
    # a lone token's whole step is one call where the routers are ones the C router takes (V2's greedy
    # top-k; not the grouped ones)
    assert (model._cpu_decode.whole is not None) == (name == "deepseek-v2-lite")
    counted = [load - b for load, b in zip(loads, before)]
    assert run(False) == fused
    assert all(torch.equal(load - b - c, c) for load, b, c in zip(loads, before, counted))  # the same choices counted
