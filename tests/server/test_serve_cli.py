"""`shoal serve` in a subprocess: it binds localhost on a free port, serves, and on SIGTERM ends the
requests in flight with an error event and exits 0."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

import openai
import pytest

from shoal.server.cli import add_serve_parser, parse_bytes
from serve_process import listening_port

# The lead wires `serve` into shoal/cli.py; until then the subcommand is driven through its own parser.
SERVE = (
    "import argparse, sys; from shoal.server.cli import add_serve_parser, cmd_serve; "
    "p = argparse.ArgumentParser(); add_serve_parser(p.add_subparsers(dest='command')); "
    "sys.exit(cmd_serve(p.parse_args(sys.argv[1:])))"
)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_serve_flags_and_their_defaults():
    args = parse()
    assert (args.host, args.port, args.api_key, args.max_waiting) == ("127.0.0.1", 8000, None, None)
    args = parse("--kv-cache-memory", "512MiB", "--max-num-seqs", "4", "--port", "0", "--api-key", "k")
    assert (args.kv_cache_memory, args.max_num_seqs, args.port, args.api_key) == (512 << 20, 4, 0, "k")
    assert [parse_bytes(t) for t in ("1000", "64KiB", "2G", "1.5GB", "3 mb")] == [1000, 65536, 2 << 30, 1.5e9, 3e6]
    for bad in ("", "12XB", "-5MiB", "0"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_bytes(bad)
    with pytest.raises(SystemExit):
        parse("--max-waiting", "0")
    assert parse().tool_call_parser is None and parse("--tool-call-parser", "hermes").tool_call_parser == "hermes"
    with pytest.raises(SystemExit):
        parse("--tool-call-parser", "unknown")
    assert parse().reasoning_parser is None and parse("--reasoning-parser", "qwen3").reasoning_parser == "qwen3"
    with pytest.raises(SystemExit):
        parse("--reasoning-parser", "unknown")


def test_sigterm_ends_requests_in_flight_and_exits_cleanly(checkpoint):
    path, _ = checkpoint("llama")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE, "serve", "--model", str(path), "--port", "0", "--dtype", "float32",
         "--served-model-name", "tiny", "--kv-cache-memory", "64KiB", "--log-level", "info"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        port, lines = listening_port(process)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=30)
        assert client.completions.create(model="tiny", prompt="hi", max_tokens=3,
                                         extra_body={"ignore_eos": True}).usage.completion_tokens == 3
        # 240 tokens of a tiny model take a while, but this stream is cut off by the signal.
        stream = client.completions.create(model="tiny", prompt="The quick", max_tokens=240, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))
        process.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError, match="shutting down"):
            for _ in stream:
                pass
        assert process.wait(timeout=20) == 0, "".join(lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
