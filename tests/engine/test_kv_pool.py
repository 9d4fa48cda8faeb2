"""The KV pool's default size: what max_num_seqs full contexts need, at most 4 GiB on a CPU (whose RAM the
weights and everything else share) and 80% of free memory on an accelerator, never under one context."""

from __future__ import annotations

from shoal import LLM
from shoal.engine.kv_pool import CPU_DEFAULT_BYTES, default_kv_pool

GIB = 1 << 30
PER_TOKEN = 64 << 10  # 64 KiB a token


def test_the_pool_is_what_the_contexts_need_when_that_fits():
    pool = default_kv_pool(PER_TOKEN, 4096, 4, free_bytes=20 * GIB, on_cpu=True)
    assert pool.bytes == PER_TOKEN * 4096 * 4 == GIB
    assert "4 sequences x 4096 tokens need 1.00 GiB" in pool.reason and "--kv-cache-memory" in pool.reason


def test_a_cpu_pool_is_capped_at_4_gib_an_accelerator_at_80_percent_of_free():
    cpu = default_kv_pool(PER_TOKEN, 32768, 64, free_bytes=20 * GIB, on_cpu=True)
    assert cpu.bytes == CPU_DEFAULT_BYTES and "capped at the CPU default of at most 4 GiB" in cpu.reason
    gpu = default_kv_pool(PER_TOKEN, 32768, 64, free_bytes=20 * GIB, on_cpu=False)
    assert gpu.bytes == int(0.8 * 20 * GIB) and "80% of free memory" in gpu.reason
    small = default_kv_pool(PER_TOKEN, 8192, 64, free_bytes=2 * GIB, on_cpu=True)  # under 4 GiB free
    assert small.bytes == int(0.8 * 2 * GIB)


def test_one_full_context_is_the_floor_and_says_how_to_shrink_it():
    pool = default_kv_pool(PER_TOKEN, 163840, 64, free_bytes=20 * GIB, on_cpu=True)
    assert pool.bytes == PER_TOKEN * 163840 and "--max-model-len" in pool.reason


def test_llm_keeps_the_pool_it_chose_and_why():
    llm = LLM(dtype="float32", progress=False, max_num_seqs=2)
    assert 0 < llm.kv_pool.bytes <= CPU_DEFAULT_BYTES
    assert llm.kv_pool.describe().startswith("KV cache pool ") and "2 sequences" in llm.kv_pool.reason
    fixed = LLM(dtype="float32", progress=False, kv_cache_memory=1 << 24)
    assert fixed.kv_pool.bytes == 1 << 24 and fixed.kv_pool.reason == "--kv-cache-memory"
