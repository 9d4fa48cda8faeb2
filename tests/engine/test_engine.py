"""The engine: batching does not change greedy tokens; preemption, chunked prefill and prefix caching
finish every request with the same tokens; every KV block is free afterwards."""

from __future__ import annotations

import random

import pytest

from shoal import LLM, SamplingParams
from shoal.errors import InvalidRequestError
from shoal.layers.paged_kv_cache import PagedKVCache

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, 300) for _ in range(rng.randrange(3, 40))] for _ in range(n)]


def alone(llm: LLM, batch: list[list[int]]) -> list[list[int]]:
    return [llm.generate(p, GREEDY)[0].token_ids for p in batch]


@pytest.mark.parametrize("name", ["llama", "deepseek-v3"])
def test_batch_of_32_gives_the_same_greedy_tokens_as_one_at_a_time(checkpoint, name):
    path, _ = checkpoint(name)
    llm = LLM(str(path), dtype="float32", progress=False)
    batch = prompts(32)
    together = [out.token_ids for out in llm.generate(batch, GREEDY)]
    assert together == alone(llm, batch)
    assert llm.engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("name", ["llama", "deepseek-v3"])
def test_requests_joining_a_running_batch_give_the_same_greedy_tokens(checkpoint, name):
    """With 3 running at most, each new prompt's prefill shares a step with the others' decodes: the
    step is packed from chunks of different lengths (1 and up to 40 tokens)."""
    path, _ = checkpoint(name)
    llm = LLM(str(path), dtype="float32", progress=False, max_num_seqs=3)
    batch = prompts(9, seed=4)  # seed 3 hits an exact float tie (two logits equal to 4 digits) in deepseek-v3
    params = [SamplingParams(temperature=0, max_tokens=4 + 3 * i, ignore_eos=True) for i in range(len(batch))]
    mixed_steps = []
    runner_step = llm.engine.runner.step
    llm.engine.runner.step = lambda chunks: (mixed_steps.append(len({c.num_tokens for c in chunks}) > 1),
                                             runner_step(chunks))[1]
    together = [out.token_ids for out in llm.generate(batch, params)]
    assert sum(mixed_steps) >= 6  # most prefills shared a step with decodes
    assert together == [llm.generate(p, sp)[0].token_ids for p, sp in zip(batch, params)]


@pytest.mark.parametrize("name,dtype", [("llama", "float32"), ("llama", "bfloat16"), ("deepseek-v3", "float32")])
def test_a_mixed_step_attends_its_decodes_apart_from_its_prefill_chunks(checkpoint, name, dtype, monkeypatch):
    """A step of one-token decodes beside longer chunks runs attention in two parts (PagedKVCache.parts):
    the parts split the step's tokens between them, and tokens and log-probabilities match the same steps
    run as one padded part."""
    path, _ = checkpoint(name)
    batch = prompts(9, seed=4)
    params = [SamplingParams(temperature=0, max_tokens=4 + 3 * i, ignore_eos=True, logprobs=3) for i in range(9)]
    split_mixed = PagedKVCache._split_mixed

    def run(split: bool):
        seen = []

        def spy(cache, positions, window):
            parts = split_mixed(cache, positions, window) if split else None
            seen.append((cache._batch.slot_mapping.numel(), parts))
            return parts

        monkeypatch.setattr(PagedKVCache, "_split_mixed", spy)
        llm = LLM(str(path), dtype=dtype, progress=False, max_num_seqs=3)
        return llm.generate(batch, params), seen

    split_out, seen = run(True)
    whole_out, _ = run(False)
    split_steps = [(tokens, parts) for tokens, parts in seen if parts is not None]
    assert len(split_steps) >= 6
    for tokens, parts in split_steps:
        (decode_rows, decodes), (chunk_rows, chunks) = parts
        assert sorted(decode_rows.tolist() + chunk_rows.tolist()) == list(range(tokens))
        assert decodes.decode_attention() is not None and decodes._batch.num_seqs == decode_rows.numel()
        assert chunks.decode_attention() is None
    # bf16 rounds the two kernels' sums differently: a near tie may then go the other way, after which
    # the sequences differ; until then log-probabilities agree to bf16's precision.
    tolerance, shared = (1e-4, 1.0) if dtype == "float32" else (0.05, 0.8)
    agreed = 0
    for a, b in zip(split_out, whole_out):
        same = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), len(a.token_ids))
        agreed += same
        for x, y in zip(a.outputs[0].logprobs[:same], b.outputs[0].logprobs[:same]):
            assert abs(x.logprob - y.logprob) < tolerance
    assert agreed >= shared * sum(len(a.token_ids) for a in split_out)


def test_one_sampling_params_per_prompt_or_a_clear_error(checkpoint):
    path, _ = checkpoint("llama")
    llm = LLM(str(path), dtype="float32", progress=False)
    outs = llm.generate([[5, 6, 7], [8, 9]], [SamplingParams(max_tokens=2, ignore_eos=True),
                                              SamplingParams(max_tokens=5, ignore_eos=True)])
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 5]
    with pytest.raises(InvalidRequestError, match="one per prompt"):
        llm.generate([[5, 6, 7], [8, 9]], [SamplingParams()])


def test_preemption_when_the_pool_is_too_small_still_finishes_everything(checkpoint):
    path, _ = checkpoint("llama")
    reference = LLM(str(path), dtype="float32", progress=False)
    batch = prompts(16, seed=1)
    expected = [out.token_ids for out in reference.generate(batch, GREEDY)]
    # 2 layers x 2 (k, v) x 2 heads x 16 dims x 4 bytes = 512 bytes per token: room for ~6 blocks of 16 tokens
    small = LLM(str(path), dtype="float32", progress=False, kv_cache_memory=512 * 16 * 6)
    assert small.engine.block_manager.num_blocks == 6
    assert [out.token_ids for out in small.generate(batch, GREEDY)] == expected
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.block_manager.num_used_blocks == 0


def test_chunked_prefill_gives_the_same_tokens(checkpoint):
    path, _ = checkpoint("deepseek-v2-lite")
    batch = prompts(6, seed=2)
    whole = LLM(str(path), dtype="float32", progress=False)
    chunked = LLM(str(path), dtype="float32", progress=False, max_num_batched_tokens=7)
    assert [o.token_ids for o in chunked.generate(batch, GREEDY)] == [o.token_ids for o in whole.generate(batch, GREEDY)]


def test_prefix_cache_reuses_a_shared_prompt_prefix(checkpoint):
    path, _ = checkpoint("qwen3")
    system = list(range(10, 60))  # 50 shared tokens: 3 full blocks of 16
    batch = [system + [70, 71, 72], system + [80, 81]]
    cold = LLM(str(path), dtype="float32", progress=False, enable_prefix_caching=False)
    expected = [o.token_ids for o in cold.generate(batch, GREEDY)]
    warm = LLM(str(path), dtype="float32", progress=False)
    first = warm.generate(batch[0], GREEDY)[0].token_ids
    blocks = warm.engine.block_manager
    hits_before = blocks.prefix_hits
    second = warm.generate(batch[1], GREEDY)[0].token_ids
    assert [first, second] == expected
    assert blocks.prefix_hits - hits_before == 3
    assert blocks.num_used_blocks == 0


def test_a_stream_closed_early_frees_its_blocks(checkpoint):
    path, _ = checkpoint("llama")
    llm = LLM(str(path), dtype="float32", progress=False)
    run = llm.generation([5, 6, 7], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    for _ in range(3):
        next(run)
    assert llm.engine.block_manager.num_used_blocks > 0
    run.close()
    assert llm.engine.block_manager.num_used_blocks == 0
    assert not llm.engine.has_unfinished()


def test_a_deleted_llm_frees_its_model(checkpoint):
    """The engine freezes the garbage collector's view of what is loaded (gc.freeze): the model must still
    go when the last reference does, so nothing of it may sit in a reference cycle."""
    import gc
    import weakref

    path, _ = checkpoint("deepseek-v3")
    llm = LLM(str(path), dtype="float32", progress=False)
    llm.generate([5, 6, 7], GREEDY)
    model = weakref.ref(llm.engine.model)
    del llm
    gc.collect()
    assert model() is None
