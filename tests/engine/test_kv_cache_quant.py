"""The 8-bit KV cache (--kv-cache-dtype int8|fp8): per-vector scales bound the error, the pool holds
more tokens in the same memory, and generation stays close to the full-precision cache."""

from __future__ import annotations

import pytest
import torch

from shoal import LLM, SamplingParams
from shoal.errors import ConfigError
from shoal.layers.kv_quant import dequantize, quantize

PROMPTS = [[5, 17, 33, 99, 140, 7, 8, 250, 31], list(range(40, 75)), [200, 3, 19]]


@pytest.mark.parametrize("kind, bound", [("int8", 0.5 / 127), ("fp8", 2.0**-4)])
def test_round_trip_error_is_bounded_by_each_vectors_absmax(kind, bound):
    torch.manual_seed(0)
    x = torch.randn(64, 4, 32) * torch.logspace(-3, 3, 64)[:, None, None]  # scales vary by 6 decades
    codes, scale = quantize(x, kind)
    assert codes.element_size() == 1 and scale.shape == (64, 4, 1)
    back = dequantize(codes, scale, kind, torch.float32)
    absmax = x.abs().amax(-1, keepdim=True)
    assert ((back - x).abs() <= bound * absmax + 1e-12).all()


@pytest.mark.parametrize("kind, tolerance", [("int8", 0.03), ("fp8", 0.1)])  # fp8 e4m3 keeps 3 mantissa bits
@pytest.mark.parametrize("name", ["llama", "deepseek-v3"])
def test_generation_with_an_8bit_cache_stays_close_to_full_precision(checkpoint, name, kind, tolerance):
    path, _ = checkpoint(name)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)
    full = LLM(str(path), dtype="float32", progress=False).generate(PROMPTS, params)
    quant_llm = LLM(str(path), dtype="float32", progress=False, kv_cache_dtype=kind)
    quant = quant_llm.generate(PROMPTS, params)
    compared = 0
    for a, b in zip(full, quant):
        # The first token's distribution comes from a prefill that already reads the quantized cache.
        # Tiny random models have near-flat distributions, so compare probabilities, not argmaxes.
        top_a, top_b = a.outputs[0].logprobs[0].top_logprobs, b.outputs[0].logprobs[0].top_logprobs
        for token in top_a.keys() & top_b.keys():
            assert top_b[token] == pytest.approx(top_a[token], abs=tolerance)
            compared += 1
    assert compared >= 2 * len(PROMPTS)
    assert quant_llm.engine.block_manager.num_used_blocks == 0


def test_an_8bit_cache_holds_more_tokens_in_the_same_memory(checkpoint):
    path, _ = checkpoint("llama")  # 2 kv heads x 16 dims: fp32 128 bytes a token and layer-entry, int8 32 + 8
    budget = 1 << 20
    full = LLM(str(path), dtype="float32", progress=False, kv_cache_memory=budget)
    small = LLM(str(path), dtype="float32", progress=False, kv_cache_memory=budget, kv_cache_dtype="int8")
    ratio = small.engine.block_manager.num_blocks / full.engine.block_manager.num_blocks
    assert ratio == pytest.approx(128 / 40, rel=0.02)
    assert small.engine.cache.layers[0][0].dtype == torch.int8


def test_an_unknown_kv_cache_dtype_says_what_to_use(checkpoint):
    path, _ = checkpoint("llama")
    with pytest.raises(ConfigError, match="auto, int8, fp8"):
        LLM(str(path), progress=False, kv_cache_dtype="int4")
