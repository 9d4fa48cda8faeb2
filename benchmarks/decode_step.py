"""One decode step at batch 32, shoal against transformers, on the same weights: median wall time
of each, and the operators that cost the most in one step of each.

    python benchmarks/decode_step.py [--model /tmp/shoal-bench-llama-34m] [--threads 1] [--dtype float32]
        [--steps 20]

The model defaults to the random llama-34m checkpoint `offline_throughput.py` builds (run that first,
or pass any checkpoint folder). Both engines prefill the same 32 random prompts of --context tokens,
then time --steps single-token steps: shoal's `engine.step()` (scheduling, paged cache, sampling
included) against transformers' forward over its DynamicCache plus an argmax.

shoal's steps alternate between the ways it can run them, in one process so that other load on the
machine hits each alike: replayed in one call (shoal/backends/cpu/capture.py) where the step can be,
layer by layer, and, for float32, layer by layer with the weights unpacked (F.linear instead of MKL's
packed sgemm, shoal/backends/cpu/packed_f32.py). The profile is of the first of them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/tmp/shoal-bench-llama-34m")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=12, help="operators listed per profile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers
    from torch.profiler import ProfilerActivity, profile

    from shoal import LLM, SamplingParams

    dtype = getattr(torch, args.dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    ids = torch.randint(3, hf.config.vocab_size, (args.batch, args.context), generator=torch.Generator().manual_seed(0))

    with torch.inference_mode():
        out = hf(ids, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)

        def hf_step():
            nonlocal nxt
            nxt = hf(nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)

        hf_times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            hf_step()
            hf_times.append(time.perf_counter() - start)
        with profile(activities=[ProfilerActivity.CPU]) as hf_prof:
            hf_step()

    llm = LLM(args.model, device="cpu", dtype=args.dtype, max_num_seqs=args.batch, progress=False)
    engine = llm.engine
    for row in ids.tolist():
        engine.add_request(row, SamplingParams(temperature=0, max_tokens=3 * args.steps + 8, ignore_eos=True))
    model = engine.model
    engine.step()  # prefill
    engine.step()
    graphs = model._step_graphs  # the step graphs, with this batch size captured at the first decode step
    replayed = bool(graphs) and bool(graphs.captures)
    packed = {m: m.prepared for m in model.modules() if getattr(m, "prepared", None) is not None}

    def use(way: str) -> None:
        model.capture_decode = way == "replayed"
        for module, copy in packed.items():
            module.prepared = None if way == "layers, unpacked" else copy

    ways = (["replayed"] if replayed else []) + ["layers"] + (["layers, unpacked"] if packed else [])
    shoal_times: dict[str, list[float]] = {way: [] for way in ways}
    for i in range(args.steps * len(ways)):
        way = ways[i % len(ways)]
        use(way)
        start = time.perf_counter()
        engine.step()
        shoal_times[way].append(time.perf_counter() - start)
    use(ways[0])
    with profile(activities=[ProfilerActivity.CPU]) as shoal_prof:
        engine.step()

    print(shoal_prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(hf_prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    hf_ms = statistics.median(hf_times) * 1e3
    print(f"{args.model}, {args.dtype}, {args.threads} thread(s), batch {args.batch}, context {args.context}: "
          f"median decode step, transformers {hf_ms:.1f} ms; shoal:")
    for way in ways:
        ms = statistics.median(shoal_times[way]) * 1e3
        print(f"  {way:<18} {ms:6.1f} ms  ({hf_ms / ms:.2f}x transformers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
