"""`shoal bench`: offline throughput, in the spirit of vLLM's benchmark_throughput — N random-token
prompts of a fixed length, each generating a fixed number of tokens (EOS ignored), all submitted at
once to the continuous-batching engine; prints requests/s, output tokens/s and total tokens/s.

The clock covers submitting every request until the last one finishes; loading the model and one
short warm-up request are outside it.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `bench` subcommand to an argparse subparsers object; returns its parser."""
    bench = subparsers.add_parser("bench", help="measure offline throughput on random prompts")
    bench.add_argument("--model", default=None, help="checkpoint folder (or hub id); default: the bundled demo model")
    bench.add_argument("--device", default=None, help="cpu, cuda, cuda:1, npu, xpu, mps, ...; default: best present")
    bench.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="compute dtype"
    )
    bench.add_argument("--num-prompts", type=int, default=64, help="requests to run (default 64)")
    bench.add_argument("--input-len", type=int, default=64, help="tokens per prompt (default 64)")
    bench.add_argument("--output-len", type=int, default=64, help="tokens generated per request (default 64)")
    bench.add_argument("--max-num-seqs", type=int, default=None, help="sequences batched together at most")
    bench.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    bench.add_argument("--json-out", default=None, metavar="FILE", help="also write the results as JSON to FILE")
    return bench


def random_prompts(num_prompts: int, input_len: int, vocab_size: int, seed: int, avoid=frozenset()) -> list[list[int]]:
    """num_prompts lists of input_len token ids drawn uniformly from the vocabulary, without the ids in `avoid`."""
    allowed = [t for t in range(vocab_size) if t not in avoid]
    rng = random.Random(seed)
    return [rng.choices(allowed, k=input_len) for _ in range(num_prompts)]


def run_bench(llm, prompts: list[list[int]], output_len: int, progress: bool = True) -> dict:
    """Run every prompt to output_len tokens on llm's engine at once; return the measured figures."""
    from tqdm import tqdm

    from shoal.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    engine = llm.engine
    llm.generate(prompts[0][:8], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))  # warm-up
    preemptions = engine.scheduler.num_preemptions
    steps = 0
    # Progress counts output tokens: with every request running at once, requests all finish near the end.
    bar = tqdm(total=len(prompts) * output_len, unit="tok", desc="bench", disable=not progress, file=sys.stderr)
    start = time.perf_counter()
    seqs = [engine.add_request(ids, params) for ids in prompts]
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
    }


def cmd_bench(args: argparse.Namespace) -> int:
    from shoal.errors import InvalidRequestError
    from shoal.llm import LLM

    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise InvalidRequestError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    options = {} if args.max_num_seqs is None else {"max_num_seqs": args.max_num_seqs}
    llm = LLM(args.model, device=args.device, dtype=args.dtype, **options)
    if args.input_len + args.output_len > llm.engine.max_model_len:
        raise InvalidRequestError(
            f"--input-len + --output-len is {args.input_len + args.output_len} but the model's context is "
            f"{llm.engine.max_model_len}; shorten them"
        )
    prompts = random_prompts(
        args.num_prompts, args.input_len, llm.model_config.vocab_size, args.seed, llm.engine.eos_token_ids
    )
    result = run_bench(llm, prompts, args.output_len)
    result.update(
        model=llm.config.model_path,
        device=str(llm.device),
        dtype=str(llm.dtype).removeprefix("torch."),
        input_len=args.input_len,
        output_len=args.output_len,
        max_num_seqs=llm.config.max_num_seqs,
        seed=args.seed,
    )
    print(
        f"Throughput: {result['requests_per_second']:.2f} requests/s, "
        f"{result['output_tokens_per_second']:.2f} output tokens/s, "
        f"{result['tokens_per_second']:.2f} total tokens/s "
        f"({result['num_requests']} requests, {result['output_tokens']} output tokens in {result['elapsed_time']:.2f} s)"
    )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0
