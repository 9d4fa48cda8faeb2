"""An untrusted checkpoint cannot exhaust the machine: config.json sizes are bounded before anything is
allocated (one line, exit 2), and a chat template is bounded in render time and output size (a 400
naming the template; the server stays responsive and SIGTERM still stops it)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from shoal.chat_template import RENDER_TIMEOUT_S, ChatTemplateError, render
from serve_process import listening_port

NESTED_RANGES = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}done"
NESTED_LISTS = ("{% for a in messages * 1000 %}{% for b in messages * 1000 %}{% for c in messages * 1000 %}"
                "{% endfor %}{% endfor %}{% endfor %}done")
BIG_STRING = "{{ 'x' * 100000000 }}"
POWER = "{{ 10 ** 10000000 }}"
OUTPUT_LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxxxxxxxx{% endfor %}{% endfor %}"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("template", [NESTED_RANGES, NESTED_LISTS, BIG_STRING, POWER, OUTPUT_LOOP])
def test_a_template_bomb_is_refused_within_the_time_limit(template):
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match="chat template"):
        render(template, MESSAGES)
    assert time.monotonic() - start < RENDER_TIMEOUT_S + 1.5
    assert render("{{ messages[0]['content'] }}!", MESSAGES) == "hi!"  # no interrupt left pending


def test_a_timed_out_render_leaves_its_thread_usable():
    results = []

    def worker():
        try:
            render(NESTED_RANGES, MESSAGES)
        except ChatTemplateError:
            results.append("refused")
        time.sleep(RENDER_TIMEOUT_S / 2)  # a stray interrupt would land here
        results.append(render("{{ 1 + 1 }}", MESSAGES))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(RENDER_TIMEOUT_S * 3 + 5)
    assert results == ["refused", "2"]


def with_config(checkpoint, tmp_path, name: str, **changes):
    source, _ = checkpoint("llama")
    folder = tmp_path / name
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("changes, field", [
    ({"num_hidden_layers": 1000000}, "num_hidden_layers"), ({"vocab_size": -5}, "vocab_size"),
    ({"vocab_size": 10**12}, "vocab_size"), ({"hidden_size": "64"}, "hidden_size"),
    ({"num_local_experts": 10**9}, "num_local_experts"),
    # Within every bound, but about 18 TiB of weights: refused before allocating, by the memory check.
    ({"hidden_size": 65536, "intermediate_size": 1 << 20, "num_hidden_layers": 1000}, "needs about"),
])
def test_a_config_out_of_bounds_exits_2_with_one_line(checkpoint, tmp_path, changes, field):
    folder = with_config(checkpoint, tmp_path, "bad", **changes)
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "shoal.cli", "generate", "hi", "--model", str(folder),
                             "--max-tokens", "1"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shoal: error:") and field in lines[0], result.stderr
    assert time.monotonic() - start < 60


SERVE = (
    "import argparse, sys; from shoal.server.cli import add_serve_parser, cmd_serve; "
    "p = argparse.ArgumentParser(); add_serve_parser(p.add_subparsers(dest='command')); "
    "sys.exit(cmd_serve(p.parse_args(sys.argv[1:])))"
)


def test_a_template_bomb_gets_400_and_sigterm_still_stops_the_server(checkpoint, tmp_path):
    folder = with_config(checkpoint, tmp_path, "bomb")
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = NESTED_RANGES
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE, "serve", "--model", str(folder), "--port", "0", "--dtype", "float32",
         "--served-model-name", "tiny"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        port, lines = listening_port(process)
        url = f"http://127.0.0.1:{port}"
        start = time.monotonic()
        response = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES}, timeout=30)
        assert response.status_code == 400 and "chat template" in response.json()["error"]["message"]
        assert time.monotonic() - start < RENDER_TIMEOUT_S + 3
        assert httpx.get(f"{url}/health").status_code == 200
        # A bomb in flight when the signal comes: the server still stops, and cleanly.
        threading.Thread(target=lambda: httpx.post(f"{url}/v1/chat/completions", timeout=30,
                                                   json={"model": "tiny", "messages": MESSAGES}), daemon=True).start()
        time.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=RENDER_TIMEOUT_S + 15) == 0, "".join(lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
