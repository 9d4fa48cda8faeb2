"""Offline throughput, shoal against Hugging Face `transformers` on the same weights and prompts.

For each model and dtype: (a) shoal's continuous-batching engine with all requests submitted at once
(at most --max-num-seqs, 32, running together), (b) transformers `generate` one request at a time,
and (c) transformers `generate` on left-padded batches of --max-num-seqs consecutive prompts. Greedy,
EOS ignored (shoal: ignore_eos; transformers: min_new_tokens = max_new_tokens), random token prompts.

Workloads: with --range-ratio 0 every prompt has --input-len tokens and asks for --output-len new
ones — the case where a padded batch wastes nothing. With --range-ratio R each request's lengths are
drawn from [len*(1-R), len*(1+R)] as in vLLM's random dataset: a padded batch then pads every prompt
to its batch's longest and decodes until its batch's longest request is done, as `generate` does
when requests end at different times. Throughput counts only the tokens each request asked for.
Prints output tokens/s and the ratios shoal/(b), shoal/(c).

Acceptance: shoal >= 5x (b) and >= 2x (c).

Models: "llama-34m" is a random Llama-style checkpoint (hidden 512, 6 layers, GQA 8/4, vocab 32000,
tied embeddings, ~34M parameters) built with transformers into --checkpoint-dir when absent; "demo"
is the bundled DeepSeek-V3-architecture demo model; anything else is a checkpoint folder.

Usage: python benchmarks/offline_throughput.py [--models llama-34m,demo] [--dtypes float32,bfloat16]
       [--num-prompts 32] [--range-ratio 0] [--sequential-prompts 8] [--profile]
(b) runs the first --sequential-prompts prompts only — one at a time its rate does not depend on how
many there are — so the whole run stays short.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from shoal import LLM
from shoal.bench import random_lengths, run_bench
from shoal.config import DEMO_MODEL_PATH

TARGET_VS_SEQUENTIAL = 5.0
TARGET_VS_BATCHED = 2.0

LLAMA_34M = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
)


def build_llama(path: Path) -> Path:
    """A random ~34M-parameter Llama checkpoint with a small byte-level BPE tokenizer (built once)."""
    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        return path
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    print(f"building a random Llama checkpoint in {path} ...", file=sys.stderr)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**LLAMA_34M)
    model = transformers.LlamaForCausalLM(config).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["The quick brown fox jumps over the lazy dog. "] * 20, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return path


def resolve(name: str, checkpoint_dir: Path) -> Path:
    if name == "llama-34m":
        return build_llama(checkpoint_dir)
    if name == "demo":
        return DEMO_MODEL_PATH
    return Path(name)


def make_prompts(n: int, length: int, vocab: int, seed: int, range_ratio: float) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(m)] for m in random_lengths(n, length, range_ratio, seed)]


def hf_generate(model, prompts: list[list[int]], output_len: int, pad_id: int) -> list[list[int]]:
    """One transformers generate() over `prompts` as a left-padded batch; returns the new tokens."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=output_len, min_new_tokens=output_len,
            do_sample=False, pad_token_id=pad_id,
        )
    return out[:, width:].tolist()


def load_hf(path: Path, dtype: torch.dtype):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    model.generation_config.temperature = None  # silence sampling-only defaults under greedy decoding
    model.generation_config.top_p = None
    model.generation_config.top_k = None
    return model


def hf_batches(model, prompts: list[list[int]], output_lens: list[int], batch: int, pad_id: int) -> list[list[int]]:
    """Padded batches of `batch` consecutive prompts, each decoding to its longest request; every request
    keeps only the tokens it asked for."""
    out = []
    for i in range(0, len(prompts), batch):
        lens = output_lens[i : i + batch]
        rows = hf_generate(model, prompts[i : i + batch], max(lens), pad_id)
        out.extend(row[:n] for row, n in zip(rows, lens))
    return out


def measure(path: Path, dtype_name: str, prompts: list[list[int]], output_lens: list[int], args) -> dict:
    """(a), (b) and (c) on one model and dtype, interleaved in each of args.repeats rounds so that load from
    other processes on a shared machine hits all three alike; the best round of each is kept."""
    llm = LLM(str(path), device="cpu", dtype=dtype_name, max_num_seqs=args.max_num_seqs, progress=False)
    model = load_hf(path, getattr(torch, dtype_name))
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    hf_generate(model, [prompts[0][:8]], 2, pad)  # warm-up (shoal's bench warms itself up)
    best = {"shoal": 0.0, "sequential": 0.0, "batched": 0.0}
    for _ in range(args.repeats):
        shoal = run_bench(llm, prompts, output_lens, progress=False)
        best["shoal"] = max(best["shoal"], shoal["output_tokens_per_second"])
        start = time.perf_counter()
        one_by_one = [hf_generate(model, [p], n, pad)[0]
                      for p, n in zip(prompts[: args.sequential_prompts], output_lens)]
        best["sequential"] = max(best["sequential"], sum(map(len, one_by_one)) / (time.perf_counter() - start))
        start = time.perf_counter()
        batched = hf_batches(model, prompts, output_lens, args.max_num_seqs, pad)
        best["batched"] = max(best["batched"], sum(map(len, batched)) / (time.perf_counter() - start))
    shoal_tokens = [o.token_ids for o in llm.generate(prompts[:4], [_greedy(n) for n in output_lens[:4]])]
    best["greedy_agreement"] = statistics.mean(_agreement(a, b) for a, b in zip(shoal_tokens, batched[:4]))
    best["llm"] = llm
    return best


def profile_decode_step(llm: LLM, prompts: list[list[int]], rows: int = 25) -> None:
    """Profile one shoal decode step with every prompt running; print the costliest operators."""
    from torch.profiler import ProfilerActivity, profile

    from shoal.sampling_params import SamplingParams

    engine = llm.engine
    for p in prompts:
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    while any(s.num_computed < len(s.prompt_ids) for s in engine.sequences.values()):
        engine.step()  # prefill every prompt first
    engine.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - start
    print(f"\nprofile of one decode step, batch {len(prompts)}: {wall * 1e3:.1f} ms wall")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    while engine.has_unfinished():
        engine.step()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama-34m,demo", help="comma-separated: llama-34m, demo, or folders")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--range-ratio", type=float, default=0.0,
                        help="draw each request's lengths from [len*(1-R), len*(1+R)] (default 0: all equal)")
    parser.add_argument("--max-num-seqs", type=int, default=32, help="shoal's concurrent requests")
    parser.add_argument("--sequential-prompts", type=int, default=8, help="prompts run one at a time for (b)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="rounds of (a), (b), (c), best of each kept: load on a shared machine only slows a run")
    parser.add_argument("--checkpoint-dir", default="/tmp/shoal-bench-llama-34m")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="profile one shoal decode step per model and dtype")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for name in args.models.split(","):
        path = resolve(name, Path(args.checkpoint_dir))
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        prompts = make_prompts(args.num_prompts, args.input_len, vocab, args.seed, args.range_ratio)
        output_lens = random_lengths(args.num_prompts, args.output_len, args.range_ratio, args.seed)
        for dtype_name in args.dtypes.split(","):
            m = measure(path, dtype_name, prompts, output_lens, args)
            rows.append((name, dtype_name, m["shoal"], m["sequential"], m["batched"], m["greedy_agreement"]))
            print(f"{name} {dtype_name}: shoal {m['shoal']:.0f} tok/s, HF one-by-one {m['sequential']:.0f} tok/s, "
                  f"HF batch {m['batched']:.0f} tok/s", file=sys.stderr)
            if args.profile:
                profile_decode_step(m["llm"], prompts[: args.max_num_seqs])
            del m

    spread = f" (each drawn within +-{args.range_ratio:.0%})" if args.range_ratio else ""
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; {args.num_prompts} prompts x "
          f"{args.input_len} in / {args.output_len} out{spread}, greedy, EOS ignored; "
          f"shoal max_num_seqs={args.max_num_seqs}, (c) in batches of {args.max_num_seqs}; "
          f"(b) over the first {args.sequential_prompts} prompts; best of {args.repeats} interleaved rounds")
    header = (f"{'model':<11}{'dtype':<10}{'shoal tok/s':>12}{'(b) HF 1x1':>12}{'(c) HF b=' + str(args.max_num_seqs):>12}"
              f"{'shoal/(b)':>11}{'shoal/(c)':>11}{'greedy =HF':>12}")
    print(header)
    passed = True
    for name, dtype_name, shoal_tps, seq_tps, batch_tps, same in rows:
        ok = shoal_tps >= TARGET_VS_SEQUENTIAL * seq_tps and shoal_tps >= TARGET_VS_BATCHED * batch_tps
        passed &= ok
        print(f"{name:<11}{dtype_name:<10}{shoal_tps:>12.0f}{seq_tps:>12.0f}{batch_tps:>12.0f}"
              f"{shoal_tps / seq_tps:>10.2f}x{shoal_tps / batch_tps:>10.2f}x{same:>11.0%}  {'PASS' if ok else 'FAIL'}")
    print(f"acceptance: shoal >= {TARGET_VS_SEQUENTIAL:g}x (b) and >= {TARGET_VS_BATCHED:g}x (c) -> "
          f"{'PASS' if passed else 'FAIL'}")
    print("greedy =HF: share of the first 4 prompts' output tokens that match transformers' batched run, up to the "
          "first difference (float ties can split them; bf16 more often)")
    return 0 if passed else 1


def _greedy(output_len: int):
    from shoal.sampling_params import SamplingParams

    return SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)


def _agreement(a: list[int], b: list[int]) -> float:
    """Share of tokens equal before the first difference."""
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return n / max(len(a), 1)


if __name__ == "__main__":
    sys.exit(main())
