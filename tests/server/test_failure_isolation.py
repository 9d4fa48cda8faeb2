"""One bad request never takes the server down: sampling parameters that would overflow float32 are
clamped or refused, a step that fails for one sequence ends only that request, a full queue means
sequences that really wait, and an engine that cannot continue answers every request in flight, then
makes `shoal serve` exit non-zero."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
from server_harness import MODEL

from shoal import LLM
from shoal.server import cli
from serve_process import listening_port

NO_EOS = {"ignore_eos": True}
POISON = 277
POISONED = [POISON] * 4  # a prompt the faulty forward below refuses (no model output repeats it by chance)


@pytest.fixture(scope="module")
def path(checkpoint):
    return checkpoint("llama")[0]


@pytest.fixture(scope="module")
def server(path, serve):
    return serve(LLM(str(path), dtype="float32", progress=False))


@pytest.mark.parametrize("fields", [
    {"temperature": 1e-46}, {"temperature": 5e-324}, {"temperature": 1e-30, "top_p": 5e-324},
    {"repetition_penalty": 1e-46}, {"repetition_penalty": 5e-324}, {"temperature": 2.0, "min_p": 5e-324},
    {"temperature": 0.005, "repetition_penalty": 0.01, "frequency_penalty": -2, "presence_penalty": -2},
])
def test_overflowing_sampling_parameters_get_200_or_400_and_the_next_request_is_served(server, fields):
    body = {"model": MODEL, "prompt": "hi hi hi hi", "max_tokens": 6, **fields, **NO_EOS}
    response = server.post("/v1/completions", json=body)
    assert response.status_code in (200, 400), response.text
    if response.status_code == 200:
        assert response.json()["usage"]["completion_tokens"] == 6
    else:
        assert response.json()["error"]["param"] in fields
    assert httpx.get(f"{server.url}/health").status_code == 200
    after = server.client().completions.create(model=MODEL, prompt="hello", max_tokens=3, extra_body=NO_EOS)
    assert after.usage.completion_tokens == 3


def test_a_step_that_raises_for_one_sequence_fails_only_that_request(path, serve):
    llm = LLM(str(path), dtype="float32", progress=False)
    model = llm.engine.model
    forward = model.forward

    def faulty(token_ids, positions, cache):
        hits = (token_ids[0] == POISON).int()
        if len(hits) >= 4 and bool((hits.unfold(0, 4, 1).sum(dim=1) == 4).any()):
            raise RuntimeError("secret internal detail")
        return forward(token_ids, positions, cache)

    model.forward = faulty
    server = serve(llm, max_waiting=64)
    client = server.client()
    outcomes: dict[int, object] = {}

    def normal(i: int) -> None:
        stream = client.completions.create(model=MODEL, prompt=f"the quick fox {i}", max_tokens=24, stream=True,
                                           extra_body=NO_EOS)
        reasons = [c.choices[0].finish_reason for c in stream if c.choices and c.choices[0].finish_reason]
        outcomes[i] = reasons

    threads = [threading.Thread(target=normal, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)  # the poisoned request joins a batch of running streams
    poisoned = server.post("/v1/completions", json={"model": MODEL, "prompt": POISONED, "max_tokens": 4})
    for thread in threads:
        thread.join(60)
    assert poisoned.status_code == 500, poisoned.text
    error = poisoned.json()["error"]
    assert error["code"] == "generation_failed" and "secret" not in error["message"]
    assert "goes on serving" in error["message"]
    assert outcomes == {i: ["length"] for i in range(4)}
    streamed = client.completions.create(model=MODEL, prompt=POISONED, max_tokens=4, stream=True)
    with pytest.raises(openai.APIError, match="could not run this request"):
        for _ in streamed:
            pass
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_body=NO_EOS).usage.completion_tokens == 2
    metrics = server.wait_for_metrics(lambda m: m["shoal_kv_cache_blocks_used"] == 0)
    assert metrics["shoal_kv_cache_blocks_used"] == 0 and metrics["shoal_engine_healthy"] == 1


def test_non_finite_logits_fail_only_their_request(path, serve):
    llm = LLM(str(path), dtype="float32", progress=False)
    model = llm.engine.model
    compute_logits = model.compute_logits

    def nan_for_poison(hidden, float32=False):
        logits = compute_logits(hidden, float32=float32)
        return torch.full_like(logits, float("nan")) if poisoned else logits

    poisoned = False
    model.compute_logits = nan_for_poison
    server = serve(llm)
    poisoned = True
    response = server.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3,
                                                    "temperature": 1.0})
    poisoned = False
    assert response.status_code == 500 and response.json()["error"]["code"] == "generation_failed"
    assert "not finite" in response.json()["error"]["message"]
    assert server.client().completions.create(model=MODEL, prompt="hi", max_tokens=2,
                                              extra_body=NO_EOS).usage.completion_tokens == 2


def test_max_waiting_counts_only_sequences_that_wait_for_a_slot(path, serve):
    """--max-waiting 4 with 64 free sequence slots takes a burst of 64: none of them waits for a slot."""
    server = serve(LLM(str(path), dtype="float32", progress=False, max_num_seqs=64), max_waiting=4)
    client = server.async_client()

    async def burst():
        import asyncio

        async def one(i):
            try:
                out = await client.completions.create(model=MODEL, prompt=f"word {i}", max_tokens=2, extra_body=NO_EOS)
                return out.usage.completion_tokens
            except openai.RateLimitError:
                return "429"

        try:
            return await asyncio.gather(*(one(i) for i in range(64)))
        finally:
            await client.close()

    import asyncio

    assert asyncio.run(burst()) == [2] * 64


@contextlib.contextmanager
def serving_patched(patch: str, path):
    """`shoal serve` in a subprocess after running `patch` (Python that breaks the engine somewhere);
    yields (url, process, its output lines) and kills it if it is still up at the end."""
    script = (f"import argparse, sys\n{patch}\nfrom shoal.server.cli import add_serve_parser, cmd_serve\n"
              "p = argparse.ArgumentParser(); add_serve_parser(p.add_subparsers(dest='command'))\n"
              "sys.exit(cmd_serve(p.parse_args(sys.argv[1:])))")
    process = subprocess.Popen(
        [sys.executable, "-c", script, "serve", "--model", str(path), "--port", "0", "--dtype", "float32",
         "--served-model-name", MODEL],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        port, lines = listening_port(process)
        yield f"http://127.0.0.1:{port}", process, lines
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# An engine whose own step loop breaks (here: the scheduler, outside any one request's forward pass).
BROKEN_SCHEDULER = (
    "import shoal.engine.scheduler as s; schedule = s.Scheduler.schedule\n"
    "def broken(self, *a, **k):\n"
    "    if any(277 in q.prompt_ids for q in self.waiting): raise RuntimeError('scheduler bug')\n"
    "    return schedule(self, *a, **k)\n"
    "s.Scheduler.schedule = broken"
)


def test_an_engine_that_cannot_continue_answers_503_and_the_process_exits_non_zero(path):
    with serving_patched(BROKEN_SCHEDULER, path) as (url, process, lines):
        assert httpx.get(f"{url}/health").status_code == 200
        response = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": [5, POISON], "max_tokens": 2},
                              timeout=30)
        assert response.status_code == 503 and response.json()["error"]["code"] == "engine_unavailable"
        assert httpx.get(f"{url}/health").status_code == 503
        assert process.wait(timeout=30) == 1
        assert any("the server stops in" in line for line in lines), "".join(lines)


# A split model whose worker is gone while rank 0 waits in a step (as it does until the collective
# timeout when a worker's host vanishes): the step never returns, the engine reports the lost rank.
STEP_NEVER_RETURNS = (
    "import threading, shoal.engine.runner as r, shoal.engine.llm_engine as e\n"
    "gone = threading.Event(); step = r.ModelRunner.step\n"
    "def hung(self, chunks):\n"
    "    if any(277 in c.seq.prompt_ids for c in chunks): gone.set(); threading.Event().wait()\n"
    "    return step(self, chunks)\n"
    "r.ModelRunner.step = hung\n"
    "e.LLMEngine.failure = lambda self: 'worker rank 1 (pid 1) was killed by signal 9' if gone.is_set() else None"
)


def test_requests_in_flight_are_answered_before_a_failed_engine_exits(path):
    with serving_patched(STEP_NEVER_RETURNS, path) as (url, process, lines):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        stream = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=200, stream=True,
                                           extra_body=NO_EOS)
        next(iter(stream))
        replies = []
        poisoned = threading.Thread(target=lambda: replies.append(httpx.post(
            f"{url}/v1/completions", json={"model": MODEL, "prompt": POISONED, "max_tokens": 2}, timeout=60)))
        poisoned.start()
        failed_at = time.monotonic()
        error = None
        try:
            for _ in stream:
                pass
        except openai.APIError as exc:
            error = exc
        # The stream in flight gets the error as an event (not a dropped connection), naming the lost rank ...
        assert error is not None and "worker rank 1" in str(error), repr(error)
        poisoned.join(30)
        # ... and so does the request whose step is stuck, as a 503 in the OpenAI format ...
        assert replies and replies[0].status_code == 503, replies and replies[0].text
        assert replies[0].json()["error"]["code"] == "engine_unavailable"
        answered_in = time.monotonic() - failed_at
        assert httpx.get(f"{url}/health").status_code == 503
        # ... before the process exits 1 (a supervisor restarts it), though the engine thread never returns.
        assert process.wait(timeout=30) == 1, "".join(lines)
        assert answered_in < cli.FAILED_EXIT_DELAY_S, answered_in
