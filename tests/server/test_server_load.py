"""The server under load and when things go wrong: 64 concurrent streams (with and without a KV pool
too small for all of them) finish with the right tokens and free every block; a client that goes away
frees its blocks at once; a full queue answers 429 with Retry-After; a failed engine answers 503."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import httpx
import openai
import pytest
from checkpoints import build_checkpoint
from server_harness import MODEL

from shoal import LLM, SamplingParams
from shoal.tokenizer import Tokenizer

NO_EOS = {"ignore_eos": True}
MAX_TOKENS = 8
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world", "naive", "cafe"]


@pytest.fixture(scope="module")
def path(checkpoint):
    return checkpoint("llama")[0]


def text_prompts(n: int) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(2, 9))) for _ in range(n)]


def id_prompts(n: int) -> list[list[int]]:
    rng = random.Random(1)  # 10 to 15 tokens: with 8 more, each sequence grows into a second 16-token block
    return [[rng.randrange(2, 300) for _ in range(rng.randrange(10, 16))] for _ in range(n)]


def reference_texts(path, prompts) -> list[str]:
    llm = LLM(str(path), dtype="float32", progress=False)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=0, ignore_eos=True)
    return [out.text for out in llm.generate(prompts, params)]


async def stream_all(server, prompts) -> list[tuple[str, list[str | None], object, set]]:
    client = server.async_client()

    async def one(prompt):
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=1.0, seed=0, stream=True,
            stream_options={"include_usage": True}, extra_body=NO_EOS,
        )
        text, reasons, usage, ids = [], [], None, set()
        async for chunk in stream:
            ids.add((chunk.id, chunk.created))
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                text.append(choice.text)
                reasons.append(choice.finish_reason)
        return "".join(text), [r for r in reasons if r], usage, ids

    try:
        return await asyncio.wait_for(asyncio.gather(*(one(p) for p in prompts)), timeout=120)
    finally:
        await client.close()


def check_all_finished(results, prompts, expected, prompt_lengths) -> None:
    for (text, reasons, usage, ids), want, length in zip(results, expected, prompt_lengths):
        assert reasons == ["length"]
        assert usage.completion_tokens == MAX_TOKENS and usage.prompt_tokens == length
        assert len(ids) == 1
        assert text == want


def test_64_concurrent_streams_finish_and_free_every_block(path, serve):
    prompts = text_prompts(64)
    expected = reference_texts(path, prompts)
    server = serve(LLM(str(path), dtype="float32", progress=False))
    before = server.metrics()
    results = asyncio.run(stream_all(server, prompts))
    tokenizer = Tokenizer(path)
    check_all_finished(results, prompts, expected, [len(tokenizer.encode(p)) for p in prompts])
    after = server.metrics()
    assert after["shoal_kv_cache_blocks_used"] == 0
    assert after["shoal_kv_cache_blocks_free"] == after["shoal_kv_cache_blocks_total"]
    assert after["shoal_num_requests_running"] == after["shoal_num_requests_waiting"] == 0
    assert after["shoal_generation_tokens_total"] - before["shoal_generation_tokens_total"] == 64 * MAX_TOKENS
    assert after['shoal_request_success_total{finished_reason="length"}'] == 64
    assert after["shoal_time_to_first_token_seconds_count"] == 64
    assert after["shoal_e2e_request_latency_seconds_count"] == 64
    assert after['shoal_e2e_request_latency_seconds_bucket{le="+Inf"}'] == 64


def test_a_kv_pool_too_small_for_all_preempts_and_still_finishes_everything(path, serve):
    prompts = id_prompts(48)
    expected = reference_texts(path, prompts)
    # 2 layers x 2 (k, v) x 2 heads x 16 dims x 4 bytes = 512 bytes per token: 6 blocks of 16 tokens.
    llm = LLM(str(path), dtype="float32", progress=False, kv_cache_memory=512 * 16 * 6)
    assert llm.engine.block_manager.num_blocks == 6
    server = serve(llm)
    results = asyncio.run(stream_all(server, prompts))
    check_all_finished(results, prompts, expected, [len(p) for p in prompts])
    after = server.metrics()
    assert after["shoal_num_preemptions_total"] > 0
    assert after["shoal_kv_cache_blocks_used"] == 0
    assert after['shoal_request_success_total{finished_reason="length"}'] == 48


LONG = 4000  # tokens: a stream that runs for seconds, longer than any test waits


@pytest.fixture(scope="module")
def one_slot(tmp_path_factory, serve):
    """One sequence runs at a time and one may wait: the third concurrent request is refused."""
    long_context = tmp_path_factory.mktemp("llama-long")
    build_checkpoint("llama", long_context, max_position_embeddings=LONG + 96)
    return serve(LLM(str(long_context), dtype="float32", progress=False, max_num_seqs=1), max_waiting=1)


def start_long_stream(server):
    """A streaming request that runs until closed; returns it once its first chunk is in."""
    stream = server.client().completions.create(model=MODEL, prompt="The quick", max_tokens=LONG, stream=True,
                                                extra_body=NO_EOS)
    next(iter(stream))
    return stream


def test_a_client_that_disconnects_mid_stream_frees_its_blocks_at_once(one_slot):
    before = one_slot.metrics()
    stream = start_long_stream(one_slot)
    assert one_slot.metrics()["shoal_kv_cache_blocks_used"] > 0
    stream.close()
    after = one_slot.wait_for_metrics(lambda m: m["shoal_kv_cache_blocks_used"] == 0, timeout=5)
    assert after["shoal_kv_cache_blocks_used"] == 0
    assert after["shoal_requests_aborted_total"] == before["shoal_requests_aborted_total"] + 1
    assert after["shoal_generation_tokens_total"] - before["shoal_generation_tokens_total"] < LONG
    assert after["shoal_num_requests_running"] == 0


def test_a_non_streaming_client_that_gives_up_is_aborted_too(one_slot):
    before = one_slot.metrics()
    stream = start_long_stream(one_slot)  # holds the only slot, so the next request waits
    with pytest.raises(httpx.ReadTimeout):
        one_slot.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 4}, timeout=0.5)
    waiting_gone = one_slot.wait_for_metrics(
        lambda m: m["shoal_requests_aborted_total"] == before["shoal_requests_aborted_total"] + 1, timeout=5)
    assert waiting_gone["shoal_num_requests_waiting"] == 0
    assert waiting_gone["shoal_num_requests_running"] == 1
    stream.close()
    after = one_slot.wait_for_metrics(lambda m: m["shoal_kv_cache_blocks_used"] == 0, timeout=5)
    assert after["shoal_requests_aborted_total"] == before["shoal_requests_aborted_total"] + 2


def test_a_full_queue_answers_429_with_retry_after(one_slot):
    before = one_slot.metrics()
    stream = start_long_stream(one_slot)
    outcomes: list[object] = []

    def request() -> None:
        try:
            out = one_slot.client().completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_body=NO_EOS)
            outcomes.append(out.usage.completion_tokens)
        except openai.RateLimitError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=request) for _ in range(6)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while sum(isinstance(o, openai.RateLimitError) for o in outcomes) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    stream.close()  # frees the slot: the one request that waited now runs
    for thread in threads:
        thread.join(30)
    refused = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
    assert len(outcomes) == 6 and len(refused) == 5 and outcomes.count(2) == 1
    for exc in refused:
        assert exc.response.headers["retry-after"] == "1"
        assert exc.body["code"] == "queue_full"
    after = one_slot.metrics()
    assert after["shoal_requests_rejected_total"] - before["shoal_requests_rejected_total"] == 5
    assert after["shoal_kv_cache_blocks_used"] == 0


def test_a_failed_engine_ends_streams_with_an_error_and_answers_503(path, serve):
    llm = LLM(str(path), dtype="float32", progress=False)
    step, calls = llm.engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("secret internal detail")
        return step()

    llm.engine.step = failing_step
    server = serve(llm)
    client = server.client()
    stream = client.completions.create(model=MODEL, prompt="The quick", max_tokens=50, stream=True,
                                       extra_body=NO_EOS)
    with pytest.raises(openai.APIError) as caught:
        for _ in stream:
            pass
    assert "engine failed" in caught.value.message and "secret" not in caught.value.message
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 503 and "secret" not in health.text
    with pytest.raises(openai.InternalServerError) as refused:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert refused.value.status_code == 503 and refused.value.body["code"] == "engine_unavailable"
    assert server.metrics()["shoal_engine_healthy"] == 0
