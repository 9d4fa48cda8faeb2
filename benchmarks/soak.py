"""Soak: `shoal serve` for --minutes at a share (--load, 0.8) of the capacity measured first, with a share
of streams cancelled by their client mid-stream (--cancel, 0.2) and a share of malformed or hostile
requests (--hostile, 0.01). Checks that

  nothing is lost    every request is answered: a whole stream or reply, a cancelled stream after its
                     first chunk, an OpenAI error object (4xx) for a bad request — never a 5xx, a 429,
                     a dropped connection or a time-out;
  RSS stays flat     the server's VmRSS (/proc/PID/status), sampled every --rss-every seconds: the
                     growth from the soak's first minute to its last, and a least-squares slope;
  blocks come back   at the end, once idle, /metrics says no KV block is held
                     (shoal_kv_cache_blocks_used 0) and /health is 200.

    python benchmarks/soak.py [--minutes 10] [--model FOLDER] [--json-out benchmarks/results_soak.json]

Capacity: --capacity-clients closed-loop clients send the normal mix for --capacity-seconds; completed
requests per second is the capacity. The soak then sends Poisson arrivals at --load x capacity, each
request its own task. The normal mix: half /v1/completions (random token-id prompts, ignore_eos), half
/v1/chat/completions (a short message), 8-48 output tokens, three in four streamed. A benchmark, not a
test: it prints figures and writes JSON; the exit code is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
MODEL = "soak"
WORDS = "the a river stone light north market quiet engine paper seven window garden slow bright".split()
RSS_FLAT_FRACTION = 0.05  # "flat": the last minute's median RSS within 5% (or 16 MiB) of the first minute's
RSS_FLAT_MIB = 16.0
REQUEST_TIMEOUT_S = 120.0


@dataclass
class Tally:
    sent: dict[str, int] = field(default_factory=dict)  # kind -> requests sent
    answered: dict[str, int] = field(default_factory=dict)  # kind -> answered as they should be
    lost: list[str] = field(default_factory=list)  # what went wrong, one line each
    tokens: int = 0

    def count(self, table: dict, kind: str) -> None:
        table[kind] = table.get(kind, 0) + 1


# ---- the requests --------------------------------------------------------------------------------
def normal_request(rng: random.Random, vocab: int) -> tuple[str, dict]:
    max_tokens = rng.randint(8, 48)
    stream = rng.random() < 0.75
    if rng.random() < 0.5:
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(8, 64))]
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
        path = "/v1/completions"
    else:
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))
        body = {"model": MODEL, "messages": [{"role": "user", "content": words}], "max_tokens": max_tokens}
        path = "/v1/chat/completions"
    body["temperature"] = rng.choice([0.0, 0.7, 1.0])
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return path, body


def hostile_requests(vocab: int) -> list[tuple[str, dict, bytes]]:
    """(path, headers, body): malformed JSON and bytes, values at and past every bound, a foreign Host."""
    def completion(**fields) -> bytes:
        return json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 4, **fields}).encode()

    json_type = {"Content-Type": "application/json"}
    return [
        ("/v1/completions", json_type, b'{"model": "soak", "prompt": '),
        ("/v1/completions", json_type, b"\xff\xfe\x00garbage"),
        ("/v1/completions", json_type, completion(temperature=1e-46)),
        ("/v1/completions", json_type, completion(repetition_penalty=5e-324)),
        ("/v1/completions", json_type, completion(temperature=1e-30, top_p=5e-324)),
        ("/v1/completions", json_type, completion(max_tokens=-5)),
        ("/v1/completions", json_type, completion(prompt=[vocab + 10, 5])),
        ("/v1/completions", json_type, completion(n=10**6)),
        ("/v1/completions", json_type, completion(logprobs=10**6)),
        ("/v1/completions", json_type, completion(model="no-such-model")),
        ("/v1/completions", json_type, completion(prompt="hello " * 20000)),
        ("/v1/completions", json_type, completion(stop=["x"] * 5000)),
        ("/v1/completions", {**json_type, "Host": "evil.example"}, completion()),
        ("/v1/chat/completions", json_type, json.dumps({"model": MODEL, "messages": []}).encode()),
        ("/v1/chat/completions", json_type, json.dumps({"model": MODEL, "messages": [{"role": "wizard"}]}).encode()),
        ("/v1/chat/completions", {"Content-Type": "text/plain"}, b"hello"),
    ]


async def send_normal(client: httpx.AsyncClient, rng: random.Random, vocab: int, cancel: bool, tally: Tally) -> None:
    path, body = normal_request(rng, vocab)
    if cancel:
        body["stream"] = True
    kind = "cancelled" if cancel else "normal"
    tally.count(tally.sent, kind)
    try:
        if not body.get("stream"):
            response = await client.post(path, json=body)
            if response.status_code != 200:
                tally.lost.append(f"{kind} {path}: {response.status_code} {response.text[:200]}")
                return
            tally.tokens += response.json()["usage"]["completion_tokens"]
            tally.count(tally.answered, kind)
            return
        stop_after = rng.randint(1, 4) if cancel else None
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                tally.lost.append(f"{kind} {path}: {response.status_code} {(await response.aread())[:200]!r}")
                return
            chunks, done, finished, error = 0, False, False, None
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"]
                    continue
                chunks += 1
                finished = finished or any(c.get("finish_reason") for c in event.get("choices", []))
                if event.get("usage"):
                    tally.tokens += event["usage"]["completion_tokens"]
                if stop_after is not None and chunks >= stop_after:
                    break  # leaving the block closes the connection: the server must free the request
            if error is not None:
                tally.lost.append(f"{kind} {path}: error event {error}")
            elif stop_after is not None and chunks >= 1:
                tally.count(tally.answered, kind)
            elif done and finished:
                tally.count(tally.answered, kind)
            else:
                tally.lost.append(f"{kind} {path}: stream ended after {chunks} chunks without a finish and [DONE]")
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        tally.lost.append(f"{kind} {path}: {type(exc).__name__}: {exc}")


async def send_hostile(client: httpx.AsyncClient, rng: random.Random, vocab: int, tally: Tally,
                       which: int | None = None) -> None:
    kinds = hostile_requests(vocab)
    path, headers, content = kinds[which] if which is not None else rng.choice(kinds)
    tally.count(tally.sent, "hostile")
    try:
        response = await client.post(path, headers=headers, content=content)
    except httpx.HTTPError as exc:
        tally.lost.append(f"hostile {path} {content[:60]!r}: {type(exc).__name__}: {exc}")
        return
    ok = response.status_code == 200 or (400 <= response.status_code < 500 and response.status_code != 429
                                         and "error" in response.json())
    if ok:
        tally.count(tally.answered, "hostile")
    else:
        tally.lost.append(f"hostile {path} {content[:60]!r}: {response.status_code} {response.text[:200]}")


# ---- the phases ----------------------------------------------------------------------------------
async def measure_capacity(url: str, vocab: int, clients: int, seconds: float, seed: int) -> tuple[float, Tally]:
    tally = Tally()
    deadline = time.monotonic() + seconds

    async def client_loop(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
            while time.monotonic() < deadline:
                await send_normal(client, rng, vocab, False, tally)

    start = time.monotonic()
    await asyncio.gather(*(client_loop(i) for i in range(clients)))
    return tally.answered.get("normal", 0) / (time.monotonic() - start), tally


async def soak(url: str, vocab: int, rate: float, seconds: float, cancel: float, hostile: float, seed: int,
               pid: int, rss_every: float) -> tuple[Tally, list[tuple[float, float]], int]:
    tally, rss, tasks = Tally(), [], set()
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        # Every hostile kind once at the start, so even a short run tries each of them.
        for which in range(len(hostile_requests(vocab))):
            task = asyncio.create_task(send_hostile(client, rng, vocab, tally, which))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        start = time.monotonic()
        next_rss = start
        peak = 0
        while (now := time.monotonic()) < start + seconds:
            if now >= next_rss:
                rss.append((now - start, rss_mib(pid)))
                next_rss += rss_every
            draw = rng.random()
            request_rng = random.Random(rng.getrandbits(64))
            if draw < hostile:
                work = send_hostile(client, request_rng, vocab, tally)
            else:
                work = send_normal(client, request_rng, vocab, draw < hostile + cancel, tally)
            task = asyncio.create_task(work)
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            peak = max(peak, len(tasks))
            await asyncio.sleep(min(rng.expovariate(rate), max(0.0, next_rss - time.monotonic())))
        await asyncio.gather(*tasks)
        rss.append((time.monotonic() - start, rss_mib(pid)))
    return tally, rss, peak


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def rss_summary(samples: list[tuple[float, float]]) -> dict:
    first = [v for t, v in samples if t <= 60] or [samples[0][1]]
    end = samples[-1][0]
    last = [v for t, v in samples if t >= end - 60] or [samples[-1][1]]
    n = len(samples)
    mean_t, mean_v = sum(t for t, _ in samples) / n, sum(v for _, v in samples) / n
    var_t = sum((t - mean_t) ** 2 for t, _ in samples)
    slope = sum((t - mean_t) * (v - mean_v) for t, v in samples) / var_t * 60 if var_t else 0.0
    first_median, last_median = statistics.median(first), statistics.median(last)
    growth = last_median - first_median
    return {"first_minute_median_mib": round(first_median, 1), "last_minute_median_mib": round(last_median, 1),
            "max_mib": round(max(v for _, v in samples), 1), "growth_mib": round(growth, 1),
            "slope_mib_per_min": round(slope, 2), "samples": n,
            "flat": growth <= max(RSS_FLAT_MIB, RSS_FLAT_FRACTION * first_median)}


def metrics(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            values[series.split("{")[0]] = float(value)
    return values


def idle_metrics(url: str, timeout: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        values = metrics(url)
        idle = values.get("shoal_num_requests_running", 1) == 0 and values.get("shoal_num_requests_waiting", 1) == 0
        if (idle and values.get("shoal_kv_cache_blocks_used", 1) == 0) or time.monotonic() > deadline:
            return values
        time.sleep(0.2)


# ---- the server ----------------------------------------------------------------------------------
def start_server(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "shoal", "serve", "--port", str(port), "--served-model-name", MODEL,
               "--log-level", "warning", *(["--model", args.model] if args.model else []), *args.serve_arg]
    process = subprocess.Popen(command, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.kill()
    raise SystemExit(f"the server did not become healthy (exit code {process.poll()}); see its output above")


def vocab_size(model: str | None) -> int:
    """The served model's vocabulary, for prompts of valid ids (and one past it, for a hostile one)."""
    from shoal.config import DEMO_MODEL_PATH
    from shoal.loader import resolve_model_path
    from shoal.models.hf_config import load_model_config

    return load_model_config(resolve_model_path(model or DEMO_MODEL_PATH)).vocab_size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the soak (default 10)")
    parser.add_argument("--model", default=None, help="checkpoint to serve (default: the bundled demo model)")
    parser.add_argument("--load", type=float, default=0.8, help="share of the measured capacity to send (0.8)")
    parser.add_argument("--cancel", type=float, default=0.2, help="share of streams the client cancels (0.2)")
    parser.add_argument("--hostile", type=float, default=0.01, help="share of malformed or hostile requests (0.01)")
    parser.add_argument("--capacity-seconds", type=float, default=30.0, help="length of the capacity run (30)")
    parser.add_argument("--capacity-clients", type=int, default=32, help="closed-loop clients measuring it (32)")
    parser.add_argument("--rss-every", type=float, default=5.0, help="seconds between RSS samples (5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serve-arg", action="append", default=[], help="an extra `shoal serve` argument (repeat)")
    parser.add_argument("--json-out", default=None, help="write the figures here as JSON")
    args = parser.parse_args(argv)

    vocab = vocab_size(args.model)
    server, url = start_server(args)
    try:
        print(f"server pid {server.pid} at {url}; measuring capacity for {args.capacity_seconds:g} s "
              f"with {args.capacity_clients} clients", flush=True)
        capacity, warmup = asyncio.run(measure_capacity(url, vocab, args.capacity_clients, args.capacity_seconds,
                                                        args.seed))
        rate = args.load * capacity
        print(f"capacity {capacity:.2f} req/s; soaking {args.minutes:g} min at {rate:.2f} req/s "
              f"({args.cancel:.0%} cancelled, {args.hostile:.0%} hostile)", flush=True)
        started = time.monotonic()
        tally, rss, peak = asyncio.run(soak(url, vocab, rate, args.minutes * 60, args.cancel, args.hostile,
                                            args.seed + 1, server.pid, args.rss_every))
        elapsed = time.monotonic() - started
        end = idle_metrics(url)
        health = httpx.get(f"{url}/health", timeout=10).status_code
    finally:
        server.terminate()
        try:
            code = server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            code = server.wait()

    sent, answered = sum(tally.sent.values()), sum(tally.answered.values())
    memory = rss_summary(rss)
    result = {
        "minutes": round(elapsed / 60, 2), "capacity_req_s": round(capacity, 3), "rate_req_s": round(rate, 3),
        "capacity_run_lost": len(warmup.lost), "requests": sent, "answered": answered, "lost": len(tally.lost),
        "sent_by_kind": tally.sent, "answered_by_kind": tally.answered, "lost_examples": tally.lost[:10],
        "output_tokens": tally.tokens, "peak_in_flight": peak, "rss": memory,
        "end": {"kv_blocks_used": end.get("shoal_kv_cache_blocks_used"),
                "kv_blocks_total": end.get("shoal_kv_cache_blocks_total"),
                "running": end.get("shoal_num_requests_running"), "waiting": end.get("shoal_num_requests_waiting"),
                "aborted_total": end.get("shoal_requests_aborted_total"), "health": health},
        "server_exit_code": code,
    }
    checks = {"nothing lost": not tally.lost and not warmup.lost, "RSS flat": memory["flat"],
              "every block free": end.get("shoal_kv_cache_blocks_used") == 0, "healthy at the end": health == 200,
              "clean exit": code == 0}
    result["checks"] = checks
    print(json.dumps(result, indent=2))
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
