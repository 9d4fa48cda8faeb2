"""The CPU backend's record-and-replay of a decode step (shoal/backends/cpu/capture.py) against the eager
layer-by-layer step it records: the same kernels with the same arguments in the same order, so the same
tokens and the same log-probabilities, bit for bit, for every model family, weight format and batch size,
on whatever kernels this CPU runs."""

from __future__ import annotations

import pytest
import torch

from checkpoints import build_checkpoint
from shoal import LLM, SamplingParams
from shoal.backends.cpu import fused, gemv

pytestmark = pytest.mark.skipif(not fused.available(), reason="no C compiler here: the kernels are not built")

# Wide enough for every kernel: int4's 128-input blocks, int8's 16.
SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3)
# DeepSeek: every projection's input a multiple of 128 too (v_head_dim 32 for o_proj, q_lora_rank 128).
MOE_SHAPE = dict(hidden_size=128, moe_intermediate_size=128, intermediate_size=256, num_hidden_layers=2, v_head_dim=32)
LLAMA_MOE = ("qwen3-moe", "qwen2-moe", "mixtral")  # the Llama family with MoE blocks
# 11 prompts: with max_num_seqs 8 steps of 8 rows, then of 3; with 16, steps of 11; with 1, one at a time.
PROMPTS = [[(7 * i + 3 * j) % 250 + 3 for j in range(4 + 3 * i)] for i in range(11)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """built(name) -> a checkpoint folder of that architecture in the kernels' shapes, built once."""
    paths = {}

    def get(name: str):
        if name not in paths:
            paths[name] = tmp_path_factory.mktemp(name)
            if name == "mixtral":  # experts the dense MLP's size
                shape = dict(SHAPE, num_hidden_layers=2)
            elif name == "deepseek-v2-lite" or name in LLAMA_MOE:
                shape = MOE_SHAPE
            elif name.startswith("deepseek"):
                shape = dict(MOE_SHAPE, q_lora_rank=128)
            else:
                shape = SHAPE
            build_checkpoint(name, paths[name], **shape)
        return paths[name]

    return get


def generate(llm: LLM, capture: bool, prompts=PROMPTS):
    llm.engine.model.capture_decode = capture
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(prompts, params)]


def replays_here(name: str, dtype: str, seqs: int, kernels: str) -> bool:
    """Where every operation of such a step is one of shoal's kernels on this CPU, so the step must replay:
    the Llama family (Qwen3's per-head norms included) at up to 8 rows, on the matrix-vector
    kernels where they are chosen (kernels "shoal", or "auto" where they run vectorized; else aten
    multiplies and the step stays eager) or on float32 weights packed for MKL; DeepSeek-V2-Lite's and
    V3's steps likewise (their routers in C, V3's grouped one too; their routed experts in C, token by
    token or grouped by expert; float32 experts packed for MKL), and so Qwen3-MoE's and Mixtral's.
    Qwen2-MoE's sigmoid-gated shared expert is torch's (Ops.sigmoid_gate has no C kernel), so its steps
    run eagerly."""
    shoal_matmuls = kernels == "shoal" or gemv.vectorized()
    if name in ("llama", "qwen2", "qwen3", "mistral"):
        return (dtype == "float32" or shoal_matmuls) and seqs <= 8
    moe = name.startswith("deepseek") or name in ("qwen3-moe", "mixtral")
    return moe and (dtype == "float32" or shoal_matmuls) and seqs <= 8


CASES = [("bfloat16", None), ("bfloat16", "int8"), ("bfloat16", "int4"), ("float32", None)]


@pytest.mark.parametrize("kernels", ["auto", "shoal"])
@pytest.mark.parametrize("seqs", [1, 8, 16])
@pytest.mark.parametrize(("dtype", "quant"), CASES)
@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "mistral", "deepseek-v2-lite", "deepseek-v3"])
def test_replayed_decode_equals_the_layers(built, name, dtype, quant, seqs, kernels):
    """kernels "shoal" forces shoal's matrix-vector kernels where "auto" would not take them (a CPU without
    AVX-512: their portable loops), so that path is replayed and compared here too."""
    if kernels == "shoal" and (gemv.vectorized() or name not in ("llama", "qwen2", "deepseek-v2-lite") or seqs > 8):
        pytest.skip("the same kernels as auto on this CPU, or a step the forced kernels do not make replayable")
    llm = LLM(str(built(name)), dtype=dtype, progress=False, max_model_len=128, max_num_seqs=seqs, quant=quant,
              quant_group_size=32, kv_cache_memory=8 << 20, enable_prefix_caching=False, cpu_kernels=kernels)
    model = llm.engine.model
    loads = [m.expert_load for m in model.modules() if hasattr(m, "expert_load")]
    before = [load.clone() for load in loads]
    captured = generate(llm, True)
    graphs = model._step_graphs
    assert graphs, "the CPU backend hands out step graphs wherever its kernels are built"
    counted = [load - b for load, b in zip(loads, before)]
    eager = generate(llm, False)
    assert captured == eager
    # the replayed steps counted the same expert choices as the eager ones
    assert all(torch.equal(load - b - c, c) for load, b, c in zip(loads, before, counted))
    if replays_here(name, dtype, seqs, kernels):
        assert sum(graphs.replays.values()) > 0 and not graphs.refused, graphs.refused
    else:  # a step that cannot be replayed says why, and runs eagerly
        assert sum(graphs.replays.values()) > 0 or graphs.refused


# The Llama family's MoE kin at batch 1, where a lone token's step replays (its router and experts in C):
# every weight format for Qwen3-MoE, two for Mixtral (whose experts differ only in size); Qwen2-MoE's step,
# refused (its gated shared expert is torch's), once. Batches of 8 and 16 run the same MoE layer as
# DeepSeek's, covered above; the suite's time is kept for those.
MOE_CASES = [("qwen3-moe", *case) for case in CASES] + [
    ("mixtral", "float32", None), ("mixtral", "bfloat16", "int8"), ("qwen2-moe", "float32", None)]


@pytest.mark.parametrize(("name", "dtype", "quant"), MOE_CASES)
def test_replayed_moe_decode_equals_the_layers(built, name, dtype, quant):
    test_replayed_decode_equals_the_layers(built, name, dtype, quant, 1, "auto")


def test_a_step_past_the_rotary_table_it_read_is_captured_anew(built):
    """A graph reads the rotary tables it was captured with; a step at a position past them runs eagerly
    (growing the tables) and the next one is captured again, with the same results as never replaying."""
    llm = LLM(str(built("llama")), dtype="float32", progress=False, max_model_len=128, max_num_seqs=2,
              kv_cache_memory=8 << 20, enable_prefix_caching=False)
    model = llm.engine.model
    model.model.layers[0].self_attn.rotary._grow(12)  # shared by every layer: a table of 12 positions
    prompts = [list(range(5, 13)), list(range(20, 27))]  # decoding from positions 8 and 7 to 17 and 16
    captured = generate(llm, True, prompts)
    graphs = model._step_graphs
    assert graphs.captures[2] == 2 and graphs.replays[2] > 0
    assert captured == generate(llm, False, prompts)


def test_enforce_eager_and_torch_kernels(built):
    """enforce_eager: no step is recorded; cpu_kernels="torch": none of shoal's kernels run, so nothing
    could be; both give the tokens of the default."""
    path, prompt = str(built("llama")), [[5, 6, 7]]
    params = SamplingParams(temperature=0, max_tokens=5)
    default = LLM(path, dtype="float32", progress=False, max_model_len=64, kv_cache_memory=4 << 20)
    eager = LLM(path, dtype="float32", progress=False, max_model_len=64, kv_cache_memory=4 << 20, enforce_eager=True)
    torch_only = LLM(path, dtype="float32", progress=False, max_model_len=64, kv_cache_memory=4 << 20,
                     cpu_kernels="torch")
    tokens = [llm.generate(prompt, params)[0].outputs[0].token_ids for llm in (default, eager, torch_only)]
    assert len(tokens[0]) == 5 and default.engine.model._step_graphs.replays[1] > 0
    assert eager.engine.model._step_graphs is None and eager.engine.model.capture_decode is False
    assert torch_only.engine.model.ops.fused is False and not torch_only.engine.model._step_graphs
    assert tokens[0] == tokens[1]  # the same kernels, replayed or not
    assert torch_only.engine.model.config.vocab_size and len(tokens[2]) == 5  # other kernels: other last bits
    with pytest.raises(Exception, match="cpu_kernels must be one of auto, shoal, torch"):
        LLM(path, cpu_kernels="fast", progress=False)
