"""Batch-1 CPU decode: how long a step takes, and how much of it is outside the weight matmuls.

    python benchmarks/decode_overhead.py [--model ~/.cache/shoal-bench/llama-0.5b] [--quant int4|int8|none]
        [--threads 1] [--stub] [--profile]

With --stub every linear layer (and the output head) returns a preallocated zero tensor instead of
multiplying, so the step time left is the rest of the step: norms, rotary, the cache write, attention,
residual adds, the runner's step preparation and sampling, and Python. Stubbing needs the layers to
run one by one, so --stub also switches off the replayed decode step (shoal/backends/cpu/capture.py)
and the one-call MoE experts: compare a stubbed run with an unstubbed one run with --eager. Prints the median wall time of
--steps decode steps after a --prompt-token prefill, and their median thread CPU time (steadier on a
shared machine at one thread); --profile adds torch.profiler's self-CPU table over three more steps.
To compare two trees, run this with PYTHONPATH pointing at each, alternately.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def stub_matmuls(model: torch.nn.Module) -> None:
    from shoal.layers.linear import Linear
    from shoal.quant.layers import QuantizedLinear

    outputs: dict = {}

    def zeros(x: torch.Tensor, width: int) -> torch.Tensor:
        key = (tuple(x.shape[:-1]), width, x.dtype)
        if key not in outputs:
            outputs[key] = torch.zeros(*x.shape[:-1], width, dtype=x.dtype)
        return outputs[key]

    vocab = model.config.vocab_size
    for module in model.modules():
        if isinstance(module, (Linear, QuantizedLinear)):
            module.forward = lambda x, width=module.out_features: zeros(x, width)
    if getattr(model, "lm_head", None) is not None:
        model.lm_head.forward = lambda x: zeros(x, vocab)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.path.expanduser("~/.cache/shoal-bench/llama-0.5b"))
    parser.add_argument("--quant", default="int4", choices=["none", "int8", "int4"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--stub", action="store_true", help="stub out the weight matmuls")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--rows", type=int, default=25, help="operators listed by --profile")
    parser.add_argument("--eager", action="store_true", help="run every step layer by layer (no replay)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from shoal import LLM, SamplingParams

    llm = LLM(args.model, dtype="bfloat16", progress=False, max_model_len=args.prompt + args.steps + 64,
              kv_cache_memory=64 << 20, max_num_seqs=1, enable_prefix_caching=False,
              quant=None if args.quant == "none" else args.quant, quant_group_size=64)
    engine = llm.engine
    if args.stub or args.eager:
        engine.model.capture_decode = False  # a replayed step would not run the stubbed layers
    if args.stub:
        stub_matmuls(engine.model)
        for module in engine.model.modules():
            if hasattr(module, "_one_call"):
                module._one_call = False
    vocab = engine.model.config.vocab_size
    prompt = torch.randint(3, vocab, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    extra = 3 if args.profile else 0
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=args.steps + 3 + extra, ignore_eos=True))
    for _ in range(3):  # the prefill and two warm-up decode steps
        engine.step()
    wall, cpu = [], []
    for _ in range(args.steps):
        start, start_cpu = time.perf_counter(), time.thread_time()
        engine.step()
        cpu.append(time.thread_time() - start_cpu)
        wall.append(time.perf_counter() - start)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(extra):
                engine.step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    while engine.has_unfinished():
        engine.step()
    ms = statistics.median(wall) * 1e3
    print(f"{args.model}, {args.quant}, {args.threads} thread(s){', matmuls stubbed' if args.stub else ''}: "
          f"median decode step {ms:.2f} ms ({1e3 / ms:.1f} tok/s), min {min(wall) * 1e3:.2f} ms, "
          f"median thread CPU {statistics.median(cpu) * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
