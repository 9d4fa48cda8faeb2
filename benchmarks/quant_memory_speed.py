"""Weight memory and batch-1 decode speed of bf16, int8 and int4 weights on a ~0.5B-parameter model.

The checkpoint is Llama-style (hidden 1024, 32 layers, 16 heads, intermediate 2816, vocab 32000,
untied; 477M parameters) with random bf16 weights, written once to --cache-dir (never committed).
All three models are loaded side by side and timed in alternating rounds, so load from other
processes on a shared machine hits them alike; figures are medians.

    python benchmarks/quant_memory_speed.py [--rounds 5] [--threads 1] [--json-out FILE]
    python benchmarks/quant_memory_speed.py --kernels    # one layer's matmul: packed kernels vs dequantize-then-matmul
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shoal import LLM, SamplingParams  # noqa: E402

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def ensure_full_tokenizer(path: Path, vocab_size: int) -> None:
    """Give the checkpoint at path a tokenizer with text for all vocab_size ids (tests/checkpoints.py:
    write_full_tokenizer), so a random model's tokens stream one by one. A checkpoint cached with the
    earlier 300-token tokenizer gets its tokenizer files rewritten; its weights stay as they are."""
    sys.path.insert(0, str(ROOT / "tests"))
    from checkpoints import tokenizer_has_full_vocab, write_full_tokenizer

    if tokenizer_has_full_vocab(path, vocab_size):
        return
    if (path / "tokenizer.json").is_file():
        print(f"{path.name}: its tokenizer lacks text for most of the {vocab_size} ids; rewriting "
              "tokenizer.json and tokenizer_config.json with every id (weights untouched)", flush=True)
    write_full_tokenizer(path, vocab_size)


def build_checkpoint(path: Path) -> Path:
    """Random bf16 weights (std 0.02, norms 1), one layer at a time so memory stays near one layer."""
    from safetensors.torch import save_file

    if (path / "config.json").is_file():
        ensure_full_tokenizer(path, CONFIG["vocab_size"])
        return path
    path.mkdir(parents=True, exist_ok=True)
    c = CONFIG
    h, inter, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    weight_map = {}
    files = [("model-embed.safetensors", {"model.embed_tokens.weight": rand(vocab, h), "lm_head.weight": rand(vocab, h),
                                          "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)})]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        files.append((f"model-layer{i:02d}.safetensors", {
            p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(h, h),
            p + "self_attn.v_proj.weight": rand(h, h), p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(inter, h), p + "mlp.up_proj.weight": rand(inter, h),
            p + "mlp.down_proj.weight": rand(h, inter),
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        }))
    for name, tensors in files:
        save_file(tensors, str(path / name))
        weight_map.update({k: name for k in tensors})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ensure_full_tokenizer(path, vocab)
    (path / "config.json").write_text(json.dumps(CONFIG, indent=2))
    return path


def weight_bytes(model) -> tuple[int, int]:
    """(all parameter bytes, bytes of the decoder layers' linear weights only)."""
    total = linear = 0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        total += size
        if ".layers." in name and "norm" not in name:
            linear += size
    return total, linear


def decode_seconds(llm: LLM, tokens: int) -> float:
    prompt = list(range(3, 19))  # 16 tokens
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    t0 = time.perf_counter()
    llm.generate(prompt, params)
    return time.perf_counter() - t0


def kernel_table(threads: int) -> None:
    """One layer's matmul by every kernel the CPU backend can choose from: aten's (F.linear, the packed int8 /
    int4 kernels, dequantize-then-matmul) and shoal's matrix-vector kernels (shoal/backends/cpu/gemv.py,
    up to gemv.MAX_ROWS rows; "-" where not built or past that), whether or not `auto` would pick them here."""
    from shoal.backends.cpu import gemv
    from shoal.backends.quantized_matmul import int4_fallback, int8_fallback
    from shoal.quant.formats import Int4GroupWeight, Int8ChannelWeight

    torch.set_num_threads(threads)

    def bench(fn, n=10):
        for _ in range(2):
            fn()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    k, n = 1024, 5632
    w = torch.randn(n, k) * 0.02
    q8 = Int8ChannelWeight.quantize(w, torch.bfloat16)
    t8 = {"qweight": q8.qweight, "scales": q8.scales}
    scales8 = q8.scales.float().contiguous()
    q4 = Int4GroupWeight.quantize(w, 64, torch.bfloat16)
    t4 = {"qweight": q4.packed, "scales": q4.scales, "zeros": q4.zeros}
    u4 = torch.stack([q4.packed & 0x0F, q4.packed >> 4], dim=-1).flatten(-2).to(torch.int32).contiguous()
    int4pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u4, 1)
    scales_zeros = torch.stack([q4.scales, q4.zeros], dim=-1).transpose(0, 1).contiguous()
    t4gemv = gemv.int4_relayout(q4.packed, q4.scales, q4.zeros) if gemv.available() else None
    wb = w.to(torch.bfloat16)
    print(f"one [{k} -> {n}] matmul, bf16 activations, {threads} thread(s), median ms; shoal gemv "
          f"{gemv.lanes()} lanes")
    print("| tokens | bf16 F.linear | bf16 shoal gemv | int8pack | int8 shoal gemv | int8 dequant+matmul "
          "| int4pack | int4 shoal gemv | int4 dequant+matmul |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in (1, 4, 16, 64, 256):
        x = torch.randn(m, k, dtype=torch.bfloat16)
        ours = gemv.available() and m <= gemv.MAX_ROWS
        row = [
            bench(lambda: torch.nn.functional.linear(x, wb)),
            bench(lambda: gemv.gemv_bf16(x, wb)) if ours else None,
            bench(lambda: torch.ops.aten._weight_int8pack_mm(x, t8["qweight"], t8["scales"])),
            bench(lambda: gemv.gemv_int8(x, t8["qweight"], scales8)) if ours else None,
            bench(lambda: int8_fallback(x, t8)),
            bench(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, int4pack, 64, scales_zeros)),
            bench(lambda: gemv.gemv_int4(x, t4gemv, 64)) if ours else None,
            bench(lambda: int4_fallback(x, t4, 64)),
        ]
        print(f"| {m} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in row) + " |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "shoal-bench-llama-0.5b"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 by default: on a shared 2-core machine, 2 threads stall on each other)")
    ap.add_argument("--kernels", action="store_true", help="print the per-kernel matmul table and exit")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    if args.kernels:
        kernel_table(args.threads)
        return 0
    torch.set_num_threads(args.threads)
    path = build_checkpoint(Path(args.cache_dir))
    formats = {"bf16": {}, "int8": {"quant": "int8"}, "int4 (group 64)": {"quant": "int4", "quant_group_size": 64}}
    llms, results = {}, {}
    for name, options in formats.items():
        t0 = time.perf_counter()
        llms[name] = LLM(str(path), dtype="bfloat16", progress=False, max_model_len=256, kv_cache_memory=64 << 20,
                         max_num_seqs=4, **options)
        total, linear = weight_bytes(llms[name].model)
        results[name] = {"weight_bytes": total, "linear_weight_bytes": linear, "load_seconds": time.perf_counter() - t0,
                         "decode_tok_s": []}
        print(f"loaded {name}: {total / 2**20:.1f} MiB of weights ({time.perf_counter() - t0:.1f} s)", flush=True)
    base = results["bf16"]
    for r in range(args.rounds):
        for name, llm in llms.items():
            short = decode_seconds(llm, 1)
            full = decode_seconds(llm, args.decode_tokens + 1)
            results[name]["decode_tok_s"].append(args.decode_tokens / (full - short))
        print(f"round {r + 1}: " + ", ".join(f"{n} {v['decode_tok_s'][-1]:.1f} tok/s" for n, v in results.items()),
              flush=True)
    print()
    print(f"| weights | weight bytes | vs bf16 | decoder linears vs bf16 | decode tok/s (median of {args.rounds}) | vs bf16 |")
    print("|---|---|---|---|---|---|")
    base_speed = statistics.median(base["decode_tok_s"])
    for name, v in results.items():
        speed = statistics.median(v["decode_tok_s"])
        v["decode_tok_s_median"] = speed
        v["weight_ratio"] = v["weight_bytes"] / base["weight_bytes"]
        v["linear_weight_ratio"] = v["linear_weight_bytes"] / base["linear_weight_bytes"]
        v["speedup"] = speed / base_speed
        print(f"| {name} | {v['weight_bytes'] / 2**20:.1f} MiB | {v['weight_ratio']:.3f}x | {v['linear_weight_ratio']:.3f}x | "
              f"{speed:.2f} | {v['speedup']:.2f}x |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"threads": args.threads, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
