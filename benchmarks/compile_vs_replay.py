"""torch.compile against the CPU backend's record-and-replay of a decode step, on the same model.

    python benchmarks/compile_vs_replay.py [--dtypes float32,bfloat16] [--tokens 48] [--threads 2]
                                           [--cache-dir ~/.cache/shoal-bench]

The question issue 15 asked before the redesign chose a mechanism: what does `torch.compile` over the
model's decoder cost (compile time) and give (decode speed), against replaying a recorded step of
shoal's kernels? Three engines load the same random 16-layer Llama (benchmarks/decode_trees.py's, 238M
parameters), batch 1, greedy, EOS ignored:

  eager     cpu_kernels="torch", enforce_eager: aten operators, layer by layer from Python
  compiled  the same, with the model's decoder (the layers and the final norm) wrapped in
            torch.compile(dynamic=True): Inductor's C++ / OpenMP code for the CPU
  replayed  the default: shoal's kernels, each decode step recorded once and replayed in one call

For each: the first generate's time (for `compiled` this includes compiling; recompiles are counted),
and decode tok/s = (new tokens - 1) / (time of a --tokens generate minus a 1-token generate), median
of three. The engines alternate within one process, so load from elsewhere hits them alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "shoal-bench"))
    args = ap.parse_args()

    import torch
    import torch._dynamo

    from decode_trees import checkpoint
    from shoal import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    path = str(checkpoint(Path(args.cache_dir), "llama"))
    prompt = [[(7 * j) % 30000 + 3 for j in range(16)]]
    long = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} cores")
    print("| dtype | engine | first generate (s) | decode tok/s | vs eager | compiler |")
    print("|---|---|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        engines = {}
        for name in ("eager", "compiled", "replayed"):
            kernels = "auto" if name == "replayed" else "torch"
            llm = LLM(path, dtype=dtype, progress=False, max_model_len=512, kv_cache_memory=256 << 20,
                      enable_prefix_caching=False, cpu_kernels=kernels, enforce_eager=name != "replayed")
            if name == "compiled":
                model = llm.engine.model
                model.decoder = torch.compile(model.decoder, dynamic=True)
            engines[name] = llm
        torch._dynamo.utils.counters.clear()
        first, rates, outputs = {}, {name: [] for name in engines}, {}
        for name, llm in engines.items():
            start = time.perf_counter()
            outputs[name] = llm.generate(prompt, long)[0].outputs[0].token_ids
            first[name] = time.perf_counter() - start
        for _ in range(3):
            for name, llm in engines.items():
                start = time.perf_counter()
                llm.generate(prompt, one)
                t1 = time.perf_counter() - start
                start = time.perf_counter()
                llm.generate(prompt, long)
                rates[name].append((args.tokens - 1) / max(time.perf_counter() - start - t1, 1e-9))
        counters = torch._dynamo.utils.counters
        compiled_frames = counters["frames"].get("ok", 0)  # frames compiled, the first and every recompile
        breaks = sum(counters["graph_break"].values())
        eager = statistics.median(rates["eager"])
        for name in engines:
            rate = statistics.median(rates[name])
            extra = f"{compiled_frames} frames compiled, {breaks} graph breaks" if name == "compiled" else ""
            print(f"| {dtype} | {name} | {first[name]:.1f} | {rate:.2f} | {rate / eager:.2f}x | {extra} |")
        same = outputs["compiled"] == outputs["eager"]
        print(f"  {dtype}: compiled greedy tokens {'equal' if same else 'differ from'} eager's", flush=True)


if __name__ == "__main__":
    main()
