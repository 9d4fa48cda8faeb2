"""Decode throughput of one model on one process against the same model split over two processes,
and the bytes each collective moves per generated token.

    PYTHONPATH=$PWD python benchmarks/parallel_decode.py [--tokens 64] [--batch 1 8]

Builds a random Llama-shaped checkpoint (and a small DeepSeek-V3-shaped MoE one for --ep), then runs
each configuration in its own process: tp 1 with 2 threads against tp 2 with 1 thread per rank (the
same two cores), and for the MoE model ep 1 against ep 2, printing per-expert load. Figures, not a
test: on a shared 2-core machine they are noisy; run twice.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMA = dict(vocab_size=8192, hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=12,
             num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False)
MOE = dict(vocab_size=8192, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, num_hidden_layers=4,
           num_attention_heads=8, num_key_value_heads=8, n_routed_experts=16, n_shared_experts=1,
           num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=128,
           kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=512,
           norm_topk_prob=True)


def build(kind: str, path: Path) -> None:
    import torch
    import transformers

    sys.path.insert(0, str(ROOT / "tests"))
    from checkpoints import write_tokenizer

    config = (transformers.LlamaConfig(**LLAMA) if kind == "llama" else transformers.DeepseekV3Config(**MOE))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path)


def measure(path: str, options: dict, threads: int, batch: int, tokens: int) -> dict:
    """In a child process: load, warm up, then time `batch` sequences decoding `tokens` tokens each."""
    import torch

    torch.set_num_threads(threads)
    from shoal import LLM, SamplingParams
    from shoal.parallel.layers import COLLECTIVE_BYTES

    llm = LLM(path, device="cpu", dtype="float32", progress=False, kv_cache_memory=64 << 20, **options)
    prompts = [[10 + i, 11, 12, 13] for i in range(batch)]
    llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm up
    # Time only decode: subtract a run that stops after its first token (prefill + one step).
    short = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    short = time.perf_counter() - short
    COLLECTIVE_BYTES.clear()
    start = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=tokens + 1, temperature=0, ignore_eos=True))
    elapsed = time.perf_counter() - start - short
    moved = dict(COLLECTIVE_BYTES)
    load = llm.engine.expert_load(0.0)
    llm.shutdown()
    steps = tokens + 1  # forward passes of the timed run (one prefill, then one per token)
    return {"tokens_per_s": batch * tokens / elapsed,
            "bytes_per_step": {k: v / steps for k, v in moved.items()},
            "bytes_per_token": {k: v / (steps * batch) for k, v in moved.items()},
            "expert_load": load}


def run_child(path: Path, options: dict, threads: int, batch: int, tokens: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    code = ("import json, sys; sys.path.insert(0, %r); from parallel_decode import measure; "
            "print('RESULT', json.dumps(measure(%r, %s, %d, %d, %d)))"
            % (str(Path(__file__).parent), str(path), json.dumps(options).replace("null", "None"), threads, batch,
               tokens))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"run {options} failed:\n{out.stderr[-2000:]}")
    return json.loads(line[7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [("llama", "tp 1 (2 threads)", {}, 2), ("llama", "tp 2 (1 thread/rank)", {"tp": 2}, 1),
                ("moe", "ep 1 (2 threads)", {}, 2), ("moe", "ep 2 (1 thread/rank)", {"ep": 2}, 1)]
        for kind in ("llama", "moe"):
            build(kind, Path(tmp) / kind)
        print(f"{'model':6} {'split':22} {'batch':>5} {'decode tok/s':>13}  collective bytes per generated token")
        for kind, label, options, threads in runs:
            for batch in args.batch:
                r = run_child(Path(tmp) / kind, options, threads, batch, args.tokens)
                moved = ", ".join(f"{k} {v:,.0f}" for k, v in sorted(r["bytes_per_token"].items())) or "none"
                print(f"{kind:6} {label:22} {batch:5d} {r['tokens_per_s']:13.1f}  {moved}", flush=True)
                if r["expert_load"] and batch == args.batch[-1]:
                    for layer, counts in sorted(r["expert_load"].items(), key=lambda kv: int(kv[0])):
                        print(f"{'':30} layer {layer} tokens per expert: {counts}")


if __name__ == "__main__":
    main()
