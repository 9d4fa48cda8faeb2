"""The same checkpoint and batch run offline (`LLM.generate`) and served (`shoal serve` loaded by `shoal
bench --serve-url`: B concurrent streaming clients), side by side: the engine's own decode-step time in
each, output tok/s, and batch-1 tok/s — so a served step can be held against an offline one at the same
batch.

    python benchmarks/served_vs_offline.py [--model moe|llama|PATH] [--quant int4] [--batches 1,8,32]
                                           [--input-len 128] [--output-len 64] [--rounds 2]

Checkpoints: `moe` is compare_cpu.py's ~0.5B DeepSeek-V2-Lite-shaped random MoE, `llama` its 0.5B Llama
(both built into ~/.cache/shoal-bench when missing, with a tokenizer that has text for every id). Every
request: random token-id prompts of --input-len tokens, --output-len tokens out, greedy, ignore_eos.
Both sides get the same engine options (--max-num-seqs = the largest batch, --max-model-len, the KV cache
size), and never run at once: the offline rounds run in this process first, then it is freed and the
server started.

Step times come from the engine itself (LLMEngine.on_step): offline from its records, served from the
/metrics histograms `shoal_decode_step_seconds` and `shoal_decode_step_sequences` read before and after
each load. A decode step is one of one new token per sequence; the mean batch of those steps is printed
beside each, since a served run's batch grows and shrinks as its clients come and go. Each batch is run
once to warm up (the CPU backend captures a decode step per batch size) before the measured rounds.

On a machine shared with other work, run it under `OMP_WAIT_POLICY=PASSIVE` (the server inherits the
environment): with OpenMP's default active wait, idle kernel threads spin on the cores the others need.
On 2 loaded cores (AMD EPYC, AVX2 only, load average ~8) the same MoE int4 batch-1 decode step took a
median 536-800 ms from the main thread (as `LLM.generate` runs it) against 30-34 ms from a second thread
(as the server's engine thread runs it), side by side in one process; with OMP_WAIT_POLICY=PASSIVE both
took 28-29 ms.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from serve_cpu import CACHE, free_port, load, stop, wait_ready  # noqa: E402

VOCAB = 32000  # both compare_cpu.py checkpoints'


def checkpoint(name: str) -> Path:
    from compare_cpu import build_llama, build_moe

    if name == "moe":
        return build_moe(CACHE)
    if name == "llama":
        return build_llama(CACHE)
    return Path(name)


def engine_options(args) -> dict:
    return {"quant": args.quant, "max_num_seqs": max(args.batch_sizes),
            "max_model_len": args.input_len + args.output_len + 32, "kv_cache_memory": args.kv_cache_memory}


def decode_summary(seconds: list[float], seqs: list[int]) -> dict:
    return {"decode_steps": len(seconds), "mean_decode_step_ms": 1000 * sum(seconds) / max(1, len(seconds)),
            "mean_decode_batch": sum(seqs) / max(1, len(seqs))}


def offline(path: Path, args) -> list[dict]:
    from shoal import LLM, SamplingParams
    from shoal.bench import SERVE_MIN_TOKEN_ID

    llm = LLM(str(path), dtype="bfloat16", progress=False, **engine_options(args))
    steps = []
    llm.engine.on_step = steps.append
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    rng = random.Random(0)
    rows = []
    for batch in args.batch_sizes:
        for round_index in range(args.rounds + 1):  # round 0 warms up
            prompts = [[rng.randrange(SERVE_MIN_TOKEN_ID, VOCAB) for _ in range(args.input_len)] for _ in range(batch)]
            steps.clear()
            start = time.perf_counter()
            outs = llm.generate(prompts, params)
            wall = time.perf_counter() - start
            assert all(len(o.outputs[0].token_ids) == args.output_len for o in outs)
            decode = [s for s in steps if s.decode]
            row = {"mode": "offline", "batch": batch, "round": round_index,
                   "output_throughput": batch * args.output_len / wall,
                   **decode_summary([s.seconds for s in decode], [s.num_seqs for s in decode])}
            if round_index:
                rows.append(row)
                print(json.dumps(row), flush=True)
    del llm
    gc.collect()
    return rows


def _histograms(url: str) -> dict[str, float]:
    text = httpx.get(url, timeout=30).text
    return {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(("shoal_decode_step_seconds_", "shoal_decode_step_sequences_"))
            and "_bucket{" not in line}


def served(path: Path, args) -> list[dict]:
    port = free_port()
    options = engine_options(args)
    cmd = [sys.executable, "-m", "shoal", "serve", "--model", str(path), "--port", str(port), "--dtype", "bfloat16",
           "--max-num-seqs", str(options["max_num_seqs"]), "--max-model-len", str(options["max_model_len"]),
           "--log-level", "warning"]
    if args.quant:
        cmd += ["--quant", args.quant]
    if args.kv_cache_memory:
        cmd += ["--kv-cache-memory", str(args.kv_cache_memory)]
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL,
                            stderr=None if args.server_log else subprocess.DEVNULL)
    rows = []
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", proc)
        metrics = f"http://127.0.0.1:{port}/metrics"
        for batch in args.batch_sizes:
            for round_index in range(args.rounds + 1):
                before = _histograms(metrics)
                result = load(port, SimpleNamespace(num_prompts=batch, concurrency=batch, input_len=args.input_len,
                                                    output_len=args.output_len, temperature=0.0), "shoal")
                after = _histograms(metrics)
                grew = {k: after[k] - before.get(k, 0.0) for k in after}
                count = grew["shoal_decode_step_seconds_count"]
                row = {"mode": "served", "batch": batch, "round": round_index,
                       "output_throughput": result["output_throughput"], "completed": result["completed"],
                       "median_ttft_ms": result["median_ttft_ms"], "median_tpot_ms": result["median_tpot_ms"],
                       "decode_steps": int(count),
                       "mean_decode_step_ms": 1000 * grew["shoal_decode_step_seconds_sum"] / max(1, count),
                       "mean_decode_batch": grew["shoal_decode_step_sequences_sum"] / max(1, count)}
                if round_index:
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        stop(proc)
    return rows


def table(rows: list[dict], args) -> None:
    def med(mode: str, batch: int, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["mode"] == mode and r["batch"] == batch)

    print()
    print(f"{args.model} {args.quant or 'bf16'}: {args.input_len} tokens in, {args.output_len} out, greedy; medians "
          f"over {args.rounds} rounds")
    print("| batch | offline tok/s | served tok/s | offline decode step ms (batch) | served decode step ms (batch) "
          "| served / offline step |")
    print("|---|---|---|---|---|---|")
    for batch in args.batch_sizes:
        off, on = med("offline", batch, "mean_decode_step_ms"), med("served", batch, "mean_decode_step_ms")
        print(f"| {batch} | {med('offline', batch, 'output_throughput'):.1f} | "
              f"{med('served', batch, 'output_throughput'):.1f} | {off:.1f} ({med('offline', batch, 'mean_decode_batch'):.1f}) | "
              f"{on:.1f} ({med('served', batch, 'mean_decode_batch'):.1f}) | {on / off:.2f}x |")
    if 1 in args.batch_sizes:
        for batch in args.batch_sizes:
            if batch > 1:
                print(f"served batch {batch} / served batch 1 output tok/s: "
                      f"{med('served', batch, 'output_throughput') / med('served', 1, 'output_throughput'):.2f}x")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="moe", help="moe, llama (compare_cpu.py's checkpoints) or a checkpoint folder")
    ap.add_argument("--quant", default="int4", help="int4, int8, fp8, or '' for bf16 (default int4)")
    ap.add_argument("--batches", default="1,8,32", help="batch sizes = concurrent clients (default 1,8,32)")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="measured rounds per batch, after one to warm up")
    ap.add_argument("--kv-cache-memory", default="1GiB", help="the KV cache on both sides (default 1GiB)")
    ap.add_argument("--skip", choices=["offline", "served"], default=None, help="run only the other side")
    ap.add_argument("--server-log", action="store_true", help="let the server's stderr through")
    ap.add_argument("--json-out", default=None, help="also write every round's row as JSON here")
    args = ap.parse_args(argv)
    args.quant = args.quant or None
    args.batch_sizes = [int(b) for b in args.batches.split(",")]
    from shoal.server.cli import parse_bytes

    args.kv_cache_memory = parse_bytes(args.kv_cache_memory) if args.kv_cache_memory else None
    path = checkpoint(args.model)
    rows = [] if args.skip == "offline" else offline(path, args)
    rows += [] if args.skip == "served" else served(path, args)
    if args.skip is None:
        table(rows, args)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, "runs": rows},
                                                  indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
