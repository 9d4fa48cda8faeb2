"""A split model behind `shoal serve`: two launches with their own ranks (as torchrun on two hosts
would start them) serve a request end to end; and a worker killed mid-request fails the server
cleanly — the stream gets an error naming the rank, /health turns 503, the process exits 1."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import httpx
import openai

from conftest import subprocess_env
from split_server import BOUND_S, collect, descendants, error_after_killing, free_port, serve, stop, wait_healthy


def _listening(pid: int) -> list[str]:
    """The local addresses (hex, as /proc/net lists them) of the TCP sockets process `pid` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes and fields[3] == "0A":  # 0A: LISTEN
                found.append(fields[1])
    return found


def test_two_launches_with_their_own_ranks_serve_a_request(checkpoint):
    path, _ = checkpoint("llama")
    port, master = free_port(), free_port()
    launches = []
    for rank in (0, 1):
        env = {**subprocess_env(), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master)}
        launches.append(serve(path, port, "--tp", "2", "--distributed-executor", "torchrun", env=env))
    server, worker = launches
    logs = [collect(p) for p in launches]
    try:
        wait_healthy(port, server, logs[0])
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=30)
        reply = client.completions.create(model="tiny", prompt=[5, 6, 7, 8], max_tokens=5, temperature=0,
                                          extra_body={"ignore_eos": True})
        assert reply.usage.completion_tokens == 5
        from shoal import LLM, SamplingParams

        alone = LLM(path, device="cpu", dtype="float32", progress=False, kv_cache_memory=1 << 20)
        expected = alone.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
        assert reply.choices[0].text == expected[0].outputs[0].text
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert "shoal_engine_healthy" in metrics
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=BOUND_S) == 0, "".join(logs[0])
        assert worker.wait(timeout=BOUND_S) == 0, "".join(logs[1])  # rank 0 told it to stop
    finally:
        stop(*launches)


def test_killed_worker_fails_the_server_within_a_bound(checkpoint):
    path, _ = checkpoint("deepseek-v3")
    port = free_port()
    server = serve(path, port, "--ep", "2")
    lines = collect(server)
    try:
        wait_healthy(port, server, lines)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=30)
        client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=3, extra_body={"ignore_eos": True})
        time.sleep(1.2)  # expert load is refreshed at most once a second
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert re.search(r'shoal_expert_tokens_total\{model_name="tiny",layer="1",expert="0"\} \d+', metrics)
        workers = descendants(server.pid, b"spawn_main")
        assert len(workers) == 1, workers
        # A single-host launch listens on loopback only: its rendezvous is a file store, not torch's TCPStore
        # (which listens on every interface, unauthenticated).
        for pid in (server.pid, *workers):
            listening = _listening(pid)
            assert listening and all(a.split(":")[0] in ("0100007F", "00000000000000000000000001000000")
                                     for a in listening), listening
        stream = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=240, stream=True,
                                           extra_body={"ignore_eos": True})
        error, killed_at = error_after_killing(stream, workers[0])
        assert error is not None and "worker rank 1" in error, error
        assert time.monotonic() - killed_at < BOUND_S
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
        assert health.status_code == 503 and "rank 1" in health.text
        refused = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=5,
                             json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert refused.status_code == 503
        assert server.wait(timeout=BOUND_S) == 1
        time.sleep(0.2)
        assert "worker rank 1" in "".join(lines)
    finally:
        stop(server)
