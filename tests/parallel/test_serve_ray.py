"""`shoal serve --distributed-executor ray` on a local Ray cluster (one for the module, a few CPUs, a
small object store, no dashboard): `--tp 2` and `--pp 2` give one process's greedy tokens, and a Ray
worker killed mid-stream fails the server cleanly — the stream gets an error, /health turns 503
within the collective timeout, the process exits 1. Skipped only where ray cannot be imported."""

from __future__ import annotations

import json
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from conftest import subprocess_env
from split_server import collect, descendants, error_after_killing, free_port, serve, stop, wait_healthy

pytest.importorskip("ray", reason="the Ray tests need ray: pip install -e '.[ray]'")

HERE = Path(__file__).parent
CLUSTER_CPUS = 2  # a worker actor takes one: the two servers here run at once, one worker each
COLLECTIVE_TIMEOUT_S = 10
PROMPT = [5, 6, 7, 8]
MAX_TOKENS = 6
ACTOR = b"ray::_RayWorker"  # the process title Ray gives our worker actors


class RayHead:
    """The process holding the module's cluster, started at once; `env` (which reaches it) waits until it is up,
    so the cluster starts while the checkpoint and the reference are built."""

    def __init__(self) -> None:
        # A short temp dir: Ray's unix socket paths must stay under 108 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="shoal-ray-", dir="/tmp")
        # Token auth, with a random secret in the environment, so nothing is written under ~/.ray.
        self._env = {**subprocess_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                     "RAY_USAGE_STATS_ENABLED": "0"}
        self.process = subprocess.Popen([sys.executable, str(HERE / "ray_head.py"), self.temp_dir, str(CLUSTER_CPUS)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env=self._env)

    @property
    def env(self) -> dict:
        if "RAY_ADDRESS" not in self._env:
            line = self.process.stdout.readline()
            assert line, "the Ray cluster did not start:\n" + self.process.stderr.read()[-3000:]
            self._env["RAY_ADDRESS"] = json.loads(line)["address"]
        return self._env

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head():
    head = RayHead()
    try:
        yield head
    finally:
        head.close()


@pytest.fixture(scope="module")
def path(checkpoint):
    return checkpoint("llama")[0]


@pytest.fixture(scope="module")
def one_process_text(path):
    from shoal import LLM, SamplingParams

    llm = LLM(str(path), device="cpu", dtype="float32", progress=False, kv_cache_memory=1 << 20)
    try:
        out = llm.generate([PROMPT], SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    finally:
        llm.shutdown()
    return out[0].outputs[0].text


@dataclass
class RayServer:
    process: subprocess.Popen
    lines: list[str]
    port: int

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0, timeout=60)

    def output(self) -> str:
        return "".join(self.lines)


@pytest.fixture(scope="module")
def ray_servers(ray_head, path):
    """{"tp": the --tp 2 server, "pp": the --pp 2 one}, through Ray, started together (a start mostly waits on
    imports and on Ray starting the worker actor)."""
    servers = {}
    try:
        for split in ("tp", "pp"):
            port = free_port()
            process = serve(path, port, f"--{split}", "2", "--distributed-executor", "ray", env=ray_head.env,
                            collective_timeout=COLLECTIVE_TIMEOUT_S)
            servers[split] = RayServer(process, collect(process), port)
        for server in servers.values():
            wait_healthy(server.port, server.process, server.lines, timeout=180)
        yield servers
    finally:
        stop(*(server.process for server in servers.values()))


def _greedy_text(client: openai.OpenAI) -> str:
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == MAX_TOKENS
    return reply.choices[0].text


def test_tp_2_through_ray_gives_one_process_greedy_tokens(ray_head, path, one_process_text, ray_servers):
    server = ray_servers["tp"]
    assert _greedy_text(server.client) == one_process_text, server.output()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) == 0, server.output()


def test_pp_2_through_ray_then_a_killed_worker_fails_the_server(ray_head, path, one_process_text, ray_servers):
    server, client = ray_servers["pp"], ray_servers["pp"].client
    assert _greedy_text(client) == one_process_text, server.output()
    stop(ray_servers["tp"].process)  # done already when the test above ran: then the one actor left is ours
    deadline = time.monotonic() + 15
    while len(actors := descendants(ray_head.process.pid, ACTOR)) > 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(actors) == 1, (actors, server.output())
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=200, stream=True,
                                       extra_body={"ignore_eos": True})
    error, killed_at = error_after_killing(stream, actors[0])
    assert error is not None and "worker rank 1" in error, error
    while httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=5).status_code != 503:
        assert time.monotonic() - killed_at < COLLECTIVE_TIMEOUT_S, "/health still 200:\n" + server.output()
        time.sleep(0.1)
    assert server.process.wait(timeout=COLLECTIVE_TIMEOUT_S + 15) == 1, server.output()
