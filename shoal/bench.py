"""`shoal bench`: offline throughput and serving load.

Offline (the default), in the spirit of vLLM's benchmark_throughput — N random-token prompts, each
generating a set number of tokens (EOS ignored), all submitted at once to the continuous-batching
engine (at most --max-num-seqs running together); prints requests/s, output tokens/s and total tokens/s. The clock covers
submitting every request until the last one finishes; loading the model and one short warm-up
request are outside it.

Serving load (`--serve-url http://HOST:PORT/v1`), in the spirit of vLLM's benchmark_serving — N
streaming /v1/completions requests with random token-id prompts (`max_tokens=--output-len`,
`ignore_eos`, usage in the last chunk), arriving as a Poisson process at `--request-rate` requests/s
(inf: all at once), at most `--max-concurrency` in flight. Reports request and token throughput,
TTFT, TPOT, inter-token latency and end-to-end latency (mean, median, p90, p99 in ms) and, with
`--slo-ttft-ms` and `--slo-tpot-ms`, goodput. Token counts come from the usage chunk. The clock
covers the first request sent to the last one finished; one short warm-up request is outside it.

Lengths: every prompt has --input-len tokens and every request asks for --output-len, unless
--range-ratio R > 0 (vLLM's random dataset's --random-range-ratio): then each request's input and
output lengths are drawn uniformly from [len * (1 - R), len * (1 + R)], as real traffic varies.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `bench` subcommand to an argparse subparsers object; returns its parser."""
    bench = subparsers.add_parser(
        "bench", help="measure offline throughput, or load a running server with --serve-url, on random prompts"
    )
    bench.add_argument("--model", default=None, help="checkpoint folder, GGUF file or hub id; default: the bundled demo model")
    bench.add_argument("--device", default=None, help="cpu, cuda, cuda:1, npu, xpu, mps, ...; default: best present")
    bench.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="compute dtype"
    )
    bench.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8", "fp8"],
                       help="KV cache storage (default auto: the compute dtype)")
    bench.add_argument("--num-prompts", type=int, default=64, help="requests to run (default 64)")
    bench.add_argument("--input-len", type=int, default=64, help="tokens per prompt (default 64)")
    bench.add_argument("--output-len", type=int, default=64, help="tokens generated per request (default 64)")
    bench.add_argument("--range-ratio", type=float, default=0.0,
                       help="draw each request's input and output length uniformly from "
                            "[len*(1-R), len*(1+R)] (default 0: every request the same)")
    bench.add_argument("--max-num-seqs", type=int, default=None, help="sequences batched together at most")
    bench.add_argument("--speculative", default=None, choices=["ngram", "mtp"],
                       help="speculative decoding (see `shoal generate --help`); acceptance is reported")
    bench.add_argument("--num-speculative-tokens", type=int, default=None, help="draft tokens per step")
    bench.add_argument("--speculative-max-batch", type=int, default=8,
                       help="draft only while at most this many sequences run (default 8; 0: at any batch size)")
    bench.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    bench.add_argument("--json-out", default=None, metavar="FILE", help="also write the results as JSON to FILE")
    serving = bench.add_argument_group("serving load (with --serve-url; the flags above are for the offline mode "
                                       "except --num-prompts, --input-len, --output-len, --range-ratio, --seed, "
                                       "--json-out)")
    serving.add_argument("--serve-url", default=None, metavar="URL",
                         help="load a running OpenAI-compatible server at URL (e.g. http://127.0.0.1:8000/v1) "
                              "instead of benchmarking offline")
    serving.add_argument("--model-name", default=None, help="model name to request (default: the first in /v1/models)")
    serving.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY if set)")
    serving.add_argument("--request-rate", type=float, default=None,
                         help="requests/s, Poisson arrivals (default inf: all at once)")
    serving.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: no cap)")
    serving.add_argument("--temperature", type=float, default=None,
                         help="sampling temperature of the requests, 0 to 2 (default 0: greedy)")
    serving.add_argument("--vocab-size", type=int, default=None,
                         help=f"prompt token ids are drawn from {SERVE_MIN_TOKEN_ID}..VOCAB_SIZE-1 "
                              f"(default {DEFAULT_SERVE_VOCAB}, the demo model's)")
    serving.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: time-to-first-token SLO in ms")
    serving.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: time-per-output-token SLO in ms")
    serving.add_argument("--request-timeout-s", type=float, default=None,
                         help=f"give up on one request after this long (default {DEFAULT_REQUEST_TIMEOUT_S:g})")
    serving.add_argument("--timeout-s", type=float, default=None,
                         help=f"stop the whole run after this long; unfinished requests count as failed "
                              f"(default {DEFAULT_TOTAL_TIMEOUT_S:g})")
    serving.add_argument("--no-progress", action="store_true", help="no progress bar")
    return bench


SERVE_MIN_TOKEN_ID = 10  # ids below this are kept clear of: special tokens (BOS, EOS, pad) sit there in most vocabularies
DEFAULT_SERVE_VOCAB = 4096
DEFAULT_REQUEST_TIMEOUT_S = 600.0
DEFAULT_TOTAL_TIMEOUT_S = 3600.0
_SERVING_ONLY = ("model_name", "api_key", "request_rate", "max_concurrency", "vocab_size", "slo_ttft_ms",
                 "slo_tpot_ms", "request_timeout_s", "timeout_s", "temperature")


def random_prompts(
    num_prompts: int, input_len: int, vocab_size: int, seed: int, avoid=frozenset(), range_ratio: float = 0.0
) -> list[list[int]]:
    """num_prompts lists of token ids drawn uniformly from the vocabulary, without the ids in `avoid`;
    input_len tokens each, or lengths drawn by `random_lengths` when range_ratio > 0."""
    allowed = [t for t in range(vocab_size) if t not in avoid]
    rng = random.Random(seed)
    lengths = random_lengths(num_prompts, input_len, range_ratio, seed)
    return [rng.choices(allowed, k=length) for length in lengths]


def random_lengths(n: int, length: int, range_ratio: float, seed: int) -> list[int]:
    """n lengths drawn uniformly from [length * (1 - range_ratio), length * (1 + range_ratio)], at least 1;
    all equal to `length` when range_ratio is 0."""
    if range_ratio == 0:
        return [length] * n
    rng = random.Random(f"{seed}-{length}-lengths")
    low, high = max(1, round(length * (1 - range_ratio))), max(1, round(length * (1 + range_ratio)))
    return [rng.randint(low, high) for _ in range(n)]


def max_length(length: int, range_ratio: float) -> int:
    """The longest length random_lengths can draw."""
    return max(1, round(length * (1 + range_ratio)))


def run_bench(llm, prompts: list[list[int]], output_len: int | list[int], progress: bool = True) -> dict:
    """Run every prompt to its output length (one for all, or one per prompt) on llm's engine at once;
    return the measured figures."""
    from tqdm import tqdm

    from shoal.sampling_params import SamplingParams

    output_lens = [output_len] * len(prompts) if isinstance(output_len, int) else list(output_len)
    engine = llm.engine
    llm.generate(prompts[0][:8], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))  # warm-up
    preemptions = engine.scheduler.num_preemptions
    before = dataclasses.replace(engine.speculation, accepted_at=list(engine.speculation.accepted_at))
    steps = 0
    # Progress counts output tokens: with every request running at once, requests all finish near the end.
    bar = tqdm(total=sum(output_lens), unit="tok", desc="bench", disable=not progress, file=sys.stderr)
    start = time.perf_counter()
    seqs = [
        engine.add_request(ids, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        for ids, n in zip(prompts, output_lens)
    ]
    while engine.has_unfinished():
        bar.update(len(engine.step()))
        steps += 1
    llm.backend.synchronize()
    elapsed = time.perf_counter() - start
    bar.close()
    input_tokens = sum(len(ids) for ids in prompts)
    output_tokens = sum(len(seq.output_ids) for seq in seqs)
    return {
        "num_requests": len(prompts),
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "total_num_tokens": input_tokens + output_tokens,
        "elapsed_time": elapsed,
        "requests_per_second": len(prompts) / elapsed,
        "output_tokens_per_second": output_tokens / elapsed,
        "tokens_per_second": (input_tokens + output_tokens) / elapsed,
        "engine_steps": steps,
        "preemptions": engine.scheduler.num_preemptions - preemptions,
        **(speculation_figures(before, engine.speculation) if engine.draft is not None else {}),
    }


def speculation_figures(before, after) -> dict:
    """Acceptance over a run: the difference of two SpeculationStats."""
    from shoal.engine.speculative import SpeculationStats

    run = SpeculationStats(after.num_drafts - before.num_drafts, after.num_draft_tokens - before.num_draft_tokens,
                           after.num_accepted_tokens - before.num_accepted_tokens,
                           [a - (before.accepted_at[j] if j < len(before.accepted_at) else 0)
                            for j, a in enumerate(after.accepted_at)])
    return {"spec_num_drafts": run.num_drafts, "spec_num_draft_tokens": run.num_draft_tokens,
            "spec_num_accepted_tokens": run.num_accepted_tokens, "spec_acceptance_rate": run.acceptance_rate,
            "spec_mean_accepted_length": run.mean_accepted_length,
            "spec_acceptance_per_position": run.acceptance_per_position()}


def cmd_bench(args: argparse.Namespace) -> int:
    from shoal.errors import InvalidRequestError
    from shoal.llm import LLM

    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise InvalidRequestError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.range_ratio < 1:
        raise InvalidRequestError(f"--range-ratio must be in [0, 1), got {args.range_ratio}")
    if getattr(args, "serve_url", None):
        return cmd_serving_bench(args)
    for name in _SERVING_ONLY:
        if getattr(args, name, None) is not None:
            raise InvalidRequestError(f"--{name.replace('_', '-')} applies only with --serve-url")
    options = {"kv_cache_dtype": args.kv_cache_dtype, "speculative": args.speculative,
               "num_speculative_tokens": args.num_speculative_tokens,
               "speculative_max_batch": args.speculative_max_batch or None}
    if args.max_num_seqs is not None:
        options["max_num_seqs"] = args.max_num_seqs
    llm = LLM(args.model, device=args.device, dtype=args.dtype, **options)
    longest = max_length(args.input_len, args.range_ratio) + max_length(args.output_len, args.range_ratio)
    if longest > llm.engine.max_model_len:
        raise InvalidRequestError(
            f"the longest request (input + output, after --range-ratio) is {longest} tokens but the model's "
            f"context is {llm.engine.max_model_len}; shorten --input-len / --output-len"
        )
    prompts = random_prompts(args.num_prompts, args.input_len, llm.model_config.vocab_size, args.seed,
                             llm.engine.eos_token_ids, args.range_ratio)
    output_lens = random_lengths(args.num_prompts, args.output_len, args.range_ratio, args.seed)
    result = run_bench(llm, prompts, output_lens)
    result.update(
        model=llm.config.model_path,
        device=str(llm.device),
        dtype=str(llm.dtype).removeprefix("torch."),
        kv_cache_dtype=args.kv_cache_dtype,
        input_len=args.input_len,
        output_len=args.output_len,
        range_ratio=args.range_ratio,
        max_num_seqs=llm.config.max_num_seqs,
        seed=args.seed,
    )
    print(
        f"Throughput: {result['requests_per_second']:.2f} requests/s, "
        f"{result['output_tokens_per_second']:.2f} output tokens/s, "
        f"{result['tokens_per_second']:.2f} total tokens/s "
        f"({result['num_requests']} requests, {result['output_tokens']} output tokens in {result['elapsed_time']:.2f} s)"
    )
    if "spec_acceptance_rate" in result:
        per_position = ", ".join(f"{a:.2f}" for a in result["spec_acceptance_per_position"])
        print(f"Speculative ({args.speculative}): acceptance rate {result['spec_acceptance_rate']:.2f}, "
              f"mean accepted length {result['spec_mean_accepted_length']:.2f} tokens per step, "
              f"acceptance per position [{per_position}]")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


# ---- serving load ------------------------------------------------------------------------------


@dataclass
class RequestOutcome:
    """What one streamed request measured; times in seconds."""

    success: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)  # gaps between successive text chunks
    start: float = 0.0  # perf_counter when sent


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation, as numpy's default; 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _summary(name: str, values_s: list[float]) -> dict:
    ms = [v * 1000 for v in values_s]
    return {
        f"mean_{name}_ms": sum(ms) / len(ms) if ms else 0.0,
        f"median_{name}_ms": percentile(ms, 50),
        f"p90_{name}_ms": percentile(ms, 90),
        f"p99_{name}_ms": percentile(ms, 99),
    }


def tpot(outcome: RequestOutcome) -> float:
    """Time per output token after the first, in seconds; 0 for a one-token answer."""
    return (outcome.e2e - outcome.ttft) / (outcome.output_tokens - 1) if outcome.output_tokens > 1 else 0.0


def serving_metrics(outcomes: list[RequestOutcome], duration: float, slo_ttft_ms: float | None = None,
                    slo_tpot_ms: float | None = None) -> dict:
    """The figures of a serving run, computed over its successful requests (as benchmark_serving does)."""
    ok = [o for o in outcomes if o.success]
    input_tokens = sum(o.prompt_tokens for o in ok)
    output_tokens = sum(o.output_tokens for o in ok)
    result = {
        "completed": len(ok),
        "failed": len(outcomes) - len(ok),
        "duration": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": output_tokens / duration if duration > 0 else 0.0,
        "total_token_throughput": (input_tokens + output_tokens) / duration if duration > 0 else 0.0,
        "request_goodput": None,
    }
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        good = [
            o for o in ok
            if (slo_ttft_ms is None or o.ttft * 1000 <= slo_ttft_ms) and (slo_tpot_ms is None or tpot(o) * 1000 <= slo_tpot_ms)
        ]
        result["request_goodput"] = len(good) / duration if duration > 0 else 0.0
        result["good_requests"] = len(good)
    result.update(_summary("ttft", [o.ttft for o in ok]))
    result.update(_summary("tpot", [tpot(o) for o in ok if o.output_tokens > 1]))
    result.update(_summary("itl", [gap for o in ok for gap in o.itl]))
    result.update(_summary("e2el", [o.e2e for o in ok]))
    return result


async def stream_completion(client, url: str, payload: dict, headers: dict, timeout: float) -> RequestOutcome:
    """POST one streaming completion and time its chunks; never raises (failures land in .error)."""
    outcome = RequestOutcome(start=time.perf_counter())
    try:  # wait_for rather than asyncio.timeout: shoal still supports Python 3.10
        await asyncio.wait_for(_stream_into(outcome, client, url, payload, headers), timeout)
    except asyncio.TimeoutError:
        outcome.error = f"no complete answer within {timeout:g} s"
    except Exception as exc:  # noqa: BLE001 - a benchmark records every failure and goes on
        outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.success = not outcome.error
    return outcome


async def _stream_into(outcome: RequestOutcome, client, url: str, payload: dict, headers: dict) -> None:
    start = outcome.start
    last = start
    done = usage_seen = False
    async with client.stream("POST", url, json=payload, headers=headers) as response:
        if response.status_code != 200:
            body = (await response.aread()).decode("utf-8", "replace")
            outcome.error = f"HTTP {response.status_code}: {body[:300]}"
            return
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            now = time.perf_counter()
            chunk = json.loads(data)
            if chunk.get("error"):
                outcome.error = f"error event: {json.dumps(chunk['error'])[:300]}"
                return
            if any(choice.get("text") for choice in chunk.get("choices") or []):
                if outcome.ttft == 0.0:
                    outcome.ttft = now - start
                else:
                    outcome.itl.append(now - last)
                last = now
            if chunk.get("usage"):
                usage_seen = True
                outcome.prompt_tokens = int(chunk["usage"].get("prompt_tokens") or 0)
                outcome.output_tokens = int(chunk["usage"].get("completion_tokens") or 0)
    outcome.e2e = time.perf_counter() - start
    if not done:
        outcome.error = "the stream ended before [DONE]"
    elif not usage_seen:
        outcome.error = "the stream carried no usage chunk"
    elif outcome.ttft == 0.0:
        outcome.ttft = outcome.e2e  # an answer without text: its first token is its last


async def run_serving_bench(
    base_url: str,
    model: str,
    prompts: list[list[int]],
    output_len: int | list[int],
    *,
    api_key: str | None = None,
    request_rate: float = math.inf,
    max_concurrency: int | None = None,
    seed: int = 0,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
    total_timeout: float = DEFAULT_TOTAL_TIMEOUT_S,
    progress: bool = True,
    warmup: bool = True,
    temperature: float = 0.0,
) -> tuple[list[RequestOutcome], float]:
    """Send every prompt as a streaming completion, arriving as a Poisson process at request_rate per second
    (inf: all at once), at most max_concurrency in flight; return each request's outcome and the duration.
    Requests still running after total_timeout are cancelled and count as failed. output_len: one
    max_tokens for every request, or one per prompt."""
    import httpx
    from tqdm import tqdm

    from shoal.errors import ShoalError

    output_lens = [output_len] * len(prompts) if isinstance(output_len, int) else list(output_len)
    url = base_url.rstrip("/") + "/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    in_flight = max_concurrency or len(prompts)
    limits = httpx.Limits(max_connections=in_flight + 1, max_keepalive_connections=in_flight + 1)
    # httpx's own timeouts bound each connect/read; stream_completion bounds each request's total.
    timeout = httpx.Timeout(request_timeout, connect=min(request_timeout, 30.0))

    def payload(ids: list[int], max_tokens: int) -> dict:
        return {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": temperature, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}

    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        if warmup:
            check = await stream_completion(client, url, payload(prompts[0], 2), headers, request_timeout)
            if not check.success:
                raise ShoalError(f"the warm-up request to {url} failed: {check.error}")

        rng = random.Random(seed)
        gate = asyncio.Semaphore(in_flight)
        bar = tqdm(total=len(prompts), unit="req", desc="bench", disable=not progress, file=sys.stderr)
        outcomes: list[RequestOutcome | None] = [None] * len(prompts)

        async def one(index: int, ids: list[int]) -> None:
            async with gate:
                outcomes[index] = await stream_completion(client, url, payload(ids, output_lens[index]), headers,
                                                          request_timeout)
            bar.update(1)

        async def arrivals(tasks: list[asyncio.Task]) -> None:
            for index, ids in enumerate(prompts):
                tasks.append(asyncio.create_task(one(index, ids)))
                if request_rate != math.inf and index + 1 < len(prompts):
                    await asyncio.sleep(rng.expovariate(request_rate))
            await asyncio.gather(*tasks)

        tasks: list[asyncio.Task] = []
        start = time.perf_counter()
        try:
            await asyncio.wait_for(arrivals(tasks), total_timeout)
        except asyncio.TimeoutError:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        duration = time.perf_counter() - start
        bar.close()
    unfinished = RequestOutcome(error=f"unfinished when --timeout-s {total_timeout:g} ran out")
    return [o if o is not None else unfinished for o in outcomes], duration


def _fetch_model_card(base_url: str, api_key: str | None, timeout: float) -> dict:
    """The first entry of GET {base_url}/models."""
    import httpx

    from shoal.errors import ShoalError

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/models"
    try:
        response = httpx.get(url, headers=headers, timeout=timeout, trust_env=False)
    except httpx.HTTPError as exc:
        raise ShoalError(f"cannot reach {url}: {type(exc).__name__}: {exc}") from None
    if response.status_code != 200:
        raise ShoalError(f"{url} answered HTTP {response.status_code}: {response.text[:300]}")
    data = response.json().get("data") or []
    if not data:
        raise ShoalError(f"{url} lists no model")
    return data[0]


def format_serving_table(result: dict) -> str:
    """The figures as benchmark_serving prints them."""
    width = 50
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=width, c="=")]

    def row(label: str, value, fmt: str = "") -> None:
        lines.append(f"{label:<40}{value:<10{fmt}}")

    row("Successful requests:", result["completed"])
    row("Failed requests:", result["failed"])
    row("Request rate (req/s):", "inf" if result["request_rate"] == math.inf else result["request_rate"])
    row("Maximum request concurrency:", result["max_concurrency"] or "none")
    row("Benchmark duration (s):", result["duration"], ".2f")
    row("Total input tokens:", result["total_input_tokens"])
    row("Total generated tokens:", result["total_output_tokens"])
    row("Request throughput (req/s):", result["request_throughput"], ".2f")
    if result["request_goodput"] is not None:
        row("Request goodput (req/s):", result["request_goodput"], ".2f")
    row("Output token throughput (tok/s):", result["output_throughput"], ".2f")
    row("Total token throughput (tok/s):", result["total_token_throughput"], ".2f")
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        lines.append("{s:{c}^{n}}".format(s=f" {title} ", n=width, c="-"))
        row(f"Mean {name.upper()} (ms):", result[f"mean_{name}_ms"], ".2f")
        row(f"Median {name.upper()} (ms):", result[f"median_{name}_ms"], ".2f")
        row(f"P90 {name.upper()} (ms):", result[f"p90_{name}_ms"], ".2f")
        row(f"P99 {name.upper()} (ms):", result[f"p99_{name}_ms"], ".2f")
    lines.append("=" * width)
    return "\n".join(lines)


def cmd_serving_bench(args: argparse.Namespace) -> int:
    from shoal.errors import InvalidRequestError

    for name in ("model", "device", "max_num_seqs"):
        if getattr(args, name) is not None:
            hint = "; name the served model with --model-name" if name == "model" else ""
            raise InvalidRequestError(f"--{name.replace('_', '-')} applies only to the offline mode{hint}")
    for name in ("dtype", "kv_cache_dtype"):
        if getattr(args, name) != "auto":
            raise InvalidRequestError(f"--{name.replace('_', '-')} applies only to the offline mode")
    rate = math.inf if args.request_rate is None else args.request_rate
    if not rate > 0:
        raise InvalidRequestError(f"--request-rate must be > 0 (inf: all at once), got {args.request_rate}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise InvalidRequestError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    temperature = 0.0 if args.temperature is None else args.temperature
    if not 0.0 <= temperature <= 2.0:
        raise InvalidRequestError(f"--temperature must be within [0, 2] as the OpenAI API takes it, got {args.temperature}")
    vocab = DEFAULT_SERVE_VOCAB if args.vocab_size is None else args.vocab_size
    if vocab <= SERVE_MIN_TOKEN_ID:
        raise InvalidRequestError(f"--vocab-size must be > {SERVE_MIN_TOKEN_ID}, got {vocab}")
    request_timeout = DEFAULT_REQUEST_TIMEOUT_S if args.request_timeout_s is None else args.request_timeout_s
    total_timeout = DEFAULT_TOTAL_TIMEOUT_S if args.timeout_s is None else args.timeout_s
    if not (request_timeout > 0 and total_timeout > 0):
        raise InvalidRequestError("--request-timeout-s and --timeout-s must be > 0")
    api_key = args.api_key if args.api_key is not None else os.environ.get("OPENAI_API_KEY")

    card = _fetch_model_card(args.serve_url, api_key, min(request_timeout, 30.0))
    model = args.model_name or card["id"]
    max_model_len = card.get("max_model_len")
    longest = max_length(args.input_len, args.range_ratio) + max_length(args.output_len, args.range_ratio)
    if max_model_len and longest > max_model_len:
        raise InvalidRequestError(
            f"the longest request (input + output, after --range-ratio) is {longest} tokens but the served "
            f"model's context is {max_model_len}; shorten --input-len / --output-len"
        )
    prompts = random_prompts(args.num_prompts, args.input_len, vocab, args.seed, frozenset(range(SERVE_MIN_TOKEN_ID)),
                             args.range_ratio)
    output_lens = random_lengths(args.num_prompts, args.output_len, args.range_ratio, args.seed)
    outcomes, duration = asyncio.run(run_serving_bench(
        args.serve_url, model, prompts, output_lens, api_key=api_key, request_rate=rate,
        max_concurrency=args.max_concurrency, seed=args.seed, request_timeout=request_timeout,
        total_timeout=total_timeout, progress=not args.no_progress, temperature=temperature,
    ))
    result = {
        "mode": "serving",
        "serve_url": args.serve_url,
        "model": model,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "range_ratio": args.range_ratio,
        "request_rate": rate,
        "max_concurrency": args.max_concurrency,
        "temperature": temperature,
        "seed": args.seed,
        "slo_ttft_ms": args.slo_ttft_ms,
        "slo_tpot_ms": args.slo_tpot_ms,
    }
    result.update(serving_metrics(outcomes, duration, args.slo_ttft_ms, args.slo_tpot_ms))
    result["input_lens"] = [o.prompt_tokens for o in outcomes]
    result["output_lens"] = [o.output_tokens for o in outcomes]
    result["ttfts_ms"] = [o.ttft * 1000 for o in outcomes]
    result["errors"] = [o.error for o in outcomes]
    print(format_serving_table(result))
    for error in sorted({o.error for o in outcomes if o.error})[:5]:
        print(f"failure: {error}", file=sys.stderr)
    if args.json_out:
        # inf is not JSON: write the request rate as the string "inf"
        payload = {**result, "request_rate": "inf" if rate == math.inf else rate}
        Path(args.json_out).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0 if result["failed"] == 0 else 1
