"""Decode throughput of two shoal trees side by side (an old commit against the working tree), alternated.

    python benchmarks/decode_trees.py --old /path/to/old/checkout [--new .] [--rounds 2]
        [--configs "llama bfloat16 none 1,llama bfloat16 int4 1,moe bfloat16 int4 1"]
        [--cache-dir ~/.cache/shoal-bench]

Two random checkpoints are built once into --cache-dir (never committed): a 16-layer Llama (hidden 1024,
16 heads, intermediate 2816, vocab 32000; 238M parameters) and a DeepSeek-V2-Lite-shaped MoE of 12
layers (hidden 1024, 32 routed experts top-6 plus 2 shared, expert width 512); MODEL "demo" is the
bundled demo model. Each config is "MODEL DTYPE QUANT BATCH"; each run is a fresh process with PYTHONPATH set to one tree, which loads the
model, prefills BATCH 16-token prompts and decodes 64 tokens greedily, three times; its figure is the
median of (decode tokens) / (the 64-token generate's time minus a 1-token generate's), so prefill is
left out. The trees alternate run by run so that other load on the machine hits both alike; the table
gives each tree's median over --rounds runs and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    "llama": ("llama", dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=16,
                            num_hidden_layers=16, vocab_size=32000, max_position_embeddings=4096)),
    "moe": ("deepseek-v2-lite", dict(hidden_size=1024, moe_intermediate_size=512, intermediate_size=2816,
                                     num_hidden_layers=12, v_head_dim=64, n_routed_experts=32, num_experts_per_tok=6,
                                     vocab_size=32000)),
}


def checkpoint(cache: Path, name: str) -> Path:
    if name == "demo":  # the bundled demo model (DeepSeek-V3, 8 experts top-2), trained weights
        return ROOT / "shoal" / "demo_model"
    path = cache / f"decode-trees-{name}"
    if not (path / "config.json").is_file():
        sys.path.insert(0, str(ROOT / "tests"))
        from checkpoints import build_checkpoint

        arch, shape = SHAPES[name]
        build_checkpoint(arch, path, **shape)
    return path


def measure(path: str, dtype: str, quant: str, batch: int) -> float:
    """Decode tok/s of the shoal on sys.path: median of three generates (see the module docstring)."""
    import torch

    from shoal import LLM, SamplingParams

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    llm = LLM(path, dtype=dtype, quant=None if quant == "none" else quant, progress=False, max_model_len=512,
              kv_cache_memory=256 << 20, enable_prefix_caching=False)
    ids = min(30000, llm.model_config.vocab_size - 3)
    prompts = [[(7 * i + 3 * j) % ids + 3 for j in range(16)] for i in range(batch)]
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        first = time.perf_counter() - start
        start = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
        rates.append(batch * 63 / (time.perf_counter() - start - first))
    return statistics.median(rates)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", help="the other checkout (its repository root)")
    parser.add_argument("--new", default=str(ROOT))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--configs", default="llama bfloat16 none 1,llama bfloat16 int8 1,llama bfloat16 int4 1,"
                                             "llama float32 none 1,llama bfloat16 int4 8,moe bfloat16 int4 1")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "shoal-bench"))
    parser.add_argument("--measure", nargs=4, metavar=("PATH", "DTYPE", "QUANT", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        path, dtype, quant, batch = args.measure
        print(f"{measure(path, dtype, quant, int(batch)):.2f}")
        return 0
    if not args.old:
        parser.error("--old names the checkout to compare against")
    cache = Path(args.cache_dir).expanduser()
    rows = []
    for config in args.configs.split(","):
        name, dtype, quant, batch = config.split()
        path = checkpoint(cache, name)
        figures: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(args.rounds):
            for tree in ("old", "new"):
                env = dict(os.environ, PYTHONPATH=getattr(args, tree))
                out = subprocess.run([sys.executable, __file__, "--measure", str(path), dtype, quant, batch],
                                     env=env, capture_output=True, text=True, check=True)
                figures[tree].append(float(out.stdout.strip().splitlines()[-1]))
        old, new = statistics.median(figures["old"]), statistics.median(figures["new"])
        rows.append((config, old, new))
        print(f"{config:<28} old {old:8.2f} tok/s   new {new:8.2f} tok/s   new/old {new / old:5.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
