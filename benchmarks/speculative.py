"""Speculative decoding on this CPU: decode tokens/s with a draft against without, greedy, side by side.

    python benchmarks/speculative.py [--requests 8] [--new-tokens 64] [--rounds 2] [--json-out FILE]

1. The bundled demo model (its MTP module trained by scripts/train_demo_model.py) at batch 1 over
   held-out text of its own domain: the last 2% of the training script's documents (CPython's
   docstrings), each request's prompt the first --prompt-len tokens of one held-out document. Plain
   decoding against --speculative mtp (k = 1 and 2) and ngram; acceptance per draft position.
2. The same at batch 32 (every request at once): speculation must not cost throughput there.
3. n-gram prompt lookup on a repetitive workload — a prompt that holds a code file and asks for it
   edited — on the ~0.5B random-weight Llama checkpoint of benchmarks/compare_cpu.py (built once into
   --cache-dir). Random weights do not copy their prompt, so this bounds what lookup costs when it
   rarely hits; the demo model's row of the same method shows it on real text.

Every configuration is loaded side by side and run in alternating rounds (load from other processes hits
them alike); figures are medians over rounds of output tokens / wall time of the whole batch, and the
decode steps' share: the tokens after the first over the wall time less that of the same prompts
generating one token (prefix-cached as in the whole run). Each run
checks that its tokens equal plain decoding's.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "scripts"))


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def held_out_prompts(tokenizer, n: int, prompt_len: int) -> list[list[int]]:
    """The first prompt_len tokens of n held-out documents (the training script's last 2%)."""
    from train_demo_model import stdlib_documents

    docs = stdlib_documents()
    held_out = docs[-max(1, len(docs) // 50):]
    prompts = [tokenizer.encode(doc)[:prompt_len] for doc in held_out if len(doc) > 4 * prompt_len]
    return prompts[:n]


def code_edit_prompt(tokenizer, max_tokens: int) -> list[int]:
    """A code file and the request to edit it: the answer repeats most of the prompt."""
    source = inspect.getsource(sys.modules["json.encoder"]).split("\n\n\n")[1][:6000]
    text = f"Here is a Python file:\n\n{source}\n\nRename `dct` to `mapping` and print the whole file again:\n\n"
    return tokenizer.encode(text)[-max_tokens:]


def run(llm, prompts, new_tokens: int, alone: bool) -> tuple[float, list[list[int]], dict]:
    """Generate for the prompts (one at a time when `alone`, else all at once); (output tokens/s over the
    wall time, the tokens, acceptance over this run)."""
    import dataclasses

    from shoal import SamplingParams
    from shoal.bench import speculation_figures

    engine = llm.engine
    before = dataclasses.replace(engine.speculation, accepted_at=list(engine.speculation.accepted_at))
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = [llm.generate(p, params)[0] for p in prompts] if alone else llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    tokens = [o.token_ids for o in outs]
    figures = speculation_figures(before, engine.speculation) if engine.draft is not None else {}
    return sum(map(len, tokens)) / elapsed, tokens, figures


def compare(configs: dict, prompts, new_tokens: int, rounds: int, label: str, alone: bool) -> list[dict]:
    """configs: name -> LLM, "none" among them. Alternating rounds after a warm-up; medians."""
    for llm in configs.values():
        run(llm, [prompts[0][:16]], 4, True)  # warm-up: the decode step's capture
    speeds = {name: [] for name in configs}
    decode = {name: [] for name in configs}
    figures, tokens = {}, {}
    for _ in range(rounds):
        for name, llm in configs.items():
            # The prompt and first token alone (prefix-cached as in the whole run): what the decode steps add.
            first, _, _ = run(llm, prompts, 1, alone)
            speed, toks, fig = run(llm, prompts, new_tokens, alone)
            speeds[name].append(speed)
            total = sum(map(len, toks))
            wall, wall_first = total / speed, len(prompts) / first
            decode[name].append((total - len(prompts)) / max(wall - wall_first, 1e-9))
            figures[name], tokens[name] = fig, toks
    base = statistics.median(speeds["none"])
    base_decode = statistics.median(decode["none"])
    rows = []
    for name in configs:
        median = statistics.median(speeds[name])
        median_decode = statistics.median(decode[name])
        row = {"workload": label, "config": name, "output_tok_s": round(median, 2), "vs_none": round(median / base, 3),
               "decode_tok_s": round(median_decode, 2), "decode_vs_none": round(median_decode / base_decode, 3),
               "same_tokens_as_none": tokens[name] == tokens["none"]}
        if figures[name]:
            row.update(acceptance_rate=round(figures[name]["spec_acceptance_rate"], 3),
                       mean_accepted_length=round(figures[name]["spec_mean_accepted_length"], 3),
                       acceptance_per_position=[round(a, 3) for a in figures[name]["spec_acceptance_per_position"]])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=8, help="batch-1 requests per configuration and round")
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32, help="the batched workload's size (0: leave it out)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "shoal-bench"))
    ap.add_argument("--skip-llama", action="store_true", help="leave out the ~0.5B n-gram workload")
    ap.add_argument("--skip-demo", action="store_true", help="leave out the demo model's workloads")
    ap.add_argument("--dtype", default=None, help="the models' dtype (default: the backend's choice here)")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)

    import torch

    from shoal import LLM

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads", flush=True)
    rows = []
    if not args.skip_demo:
        rows += demo_workloads(args)
    if not args.skip_llama:
        from compare_cpu import build_llama

        path = str(build_llama(Path(args.cache_dir)))
        kv = 256 << 20  # two ~2 GB float32 models side by side: keep the KV pools small
        kw = {"dtype": args.dtype} if args.dtype else {}
        llama = {"none": LLM(path, progress=False, kv_cache_memory=kv, **kw),
                 "ngram k=4": LLM(path, progress=False, speculative="ngram", num_speculative_tokens=4,
                                  kv_cache_memory=kv, **kw)}
        prompt = code_edit_prompt(llama["none"].tokenizer, 1024)
        rows += compare(llama, [prompt], args.new_tokens, args.rounds, "~0.5B random Llama, batch 1, code-edit prompt",
                        alone=True)
    if args.json_out:
        result = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "dtype": args.dtype, "new_tokens": args.new_tokens,
                  "prompt_len": args.prompt_len, "rounds": args.rounds, "rows": rows}
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def demo_workloads(args) -> list[dict]:
    from shoal import LLM

    kw = {"dtype": args.dtype} if args.dtype else {}
    demo = {
        "none": LLM(progress=False, **kw),
        "mtp k=1": LLM(progress=False, speculative="mtp", num_speculative_tokens=1, **kw),
        "mtp k=2": LLM(progress=False, speculative="mtp", num_speculative_tokens=2, **kw),
        "mtp k=3": LLM(progress=False, speculative="mtp", num_speculative_tokens=3, **kw),
        "ngram k=4": LLM(progress=False, speculative="ngram", num_speculative_tokens=4, **kw),
        # Every step eager: this row separates what the replay saves from what speculation saves.
        "none, eager": LLM(progress=False, enforce_eager=True, **kw),
    }
    tokenizer = demo["none"].tokenizer
    held_out = held_out_prompts(tokenizer, max(args.requests, args.batch), args.prompt_len)

    rows = compare(demo, held_out[: args.requests], args.new_tokens, args.rounds,
                   "demo model, batch 1, held-out docstrings", alone=True)
    if args.batch:
        rows += compare({k: demo[k] for k in ("none", "mtp k=1", "mtp k=2", "mtp k=3")}, held_out[: args.batch],
                        args.new_tokens, args.rounds, f"demo model, batch {args.batch}, held-out docstrings",
                        alone=False)
    return rows


if __name__ == "__main__":
    sys.exit(main())
