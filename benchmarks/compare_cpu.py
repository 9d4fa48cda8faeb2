"""Batch-1 prefill and decode on this CPU: shoal against transformers and llama.cpp, side by side.

    python benchmarks/compare_cpu.py [--threads 2] [--rounds 3] [--prompt-len 128] [--new-tokens 128]
                                     [--models llama,moe] [--json-out FILE] [--plot FILE.png]

Two random-weight checkpoints of the ~0.5B class, built once into --cache-dir (outside the repository;
never committed): a Llama-style model (hidden 1024, 32 layers, 16 heads, intermediate 2816, vocab
32000, untied; 477M parameters; benchmarks/quant_memory_speed.py's) and a DeepSeek-V2-Lite-shaped MoE
scaled down to the same class (MLA without q_lora_rank, first layer dense, 32 routed experts + 2
shared, top-6 softmax routing). The Llama one is also converted to GGUF (BF16, Q8_0, Q4_0, with the
`gguf` package, the way llama.cpp's converter does it: tests/gguf/hf_to_gguf.py) and run by llama.cpp
through `llama-cpp-python` (installed by this script if missing, see `ensure_llama_cpp`). Both
checkpoints carry a tokenizer with text for each of the 32000 ids (tests/checkpoints.py:
write_full_tokenizer, so that served tokens stream one by one: benchmarks/serve_cpu.py); a checkpoint
cached with the earlier 300-token tokenizer gets its tokenizer files rewritten, and a GGUF file whose
token list differs from its checkpoint's tokenizer is rebuilt.

Every engine runs the same random prompts, one request at a time, greedy, EOS ignored; all engines are
loaded side by side and run in alternating rounds so that load from other processes on a shared
machine hits them alike; figures are medians over rounds. Prefill tok/s = prompt tokens / time to the
first token; decode tok/s = (new tokens - 1) / the time after it. Each is quoted against llama.cpp
with the same weight precision, and against this machine's measured limit: for decode, memory
bandwidth (shoal doctor's copy benchmark) / weight bytes read per token (every weight but the
embedding table; for the MoE only the top-k routed experts); for prefill, the matmul peak in the
dtype the CPU computes natively (bf16 with AVX512-BF16 or AMX, else float32) / (2 x the same weights'
parameters) per token.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "gguf"))

LLAMA_CPP_VERSION = "0.3.36"


def llama_cpp_cmake_args() -> str:
    """CMake flags for llama.cpp that match this CPU: each x86 extension on only where /proc/cpuinfo lists
    it (a build with AVX-512 on an AVX2-only EPYC dies of SIGILL), and AMX always off (this llama.cpp's
    AMX kernels crash on quantized models on the development Xeon)."""
    try:
        flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    except (OSError, StopIteration):
        flags = set()
    want = {"GGML_AVX2": "avx2", "GGML_FMA": "fma", "GGML_F16C": "f16c", "GGML_AVX512": "avx512f",
            "GGML_AVX512_VBMI": "avx512vbmi", "GGML_AVX512_VNNI": "avx512_vnni", "GGML_AVX512_BF16": "avx512_bf16"}
    args = ["-DGGML_NATIVE=OFF"] + [f"-D{k}={'ON' if v in flags else 'OFF'}" for k, v in want.items()]
    return " ".join(args + ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"])


MOE_CONFIG = dict(
    vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, num_hidden_layers=8,
    num_attention_heads=16, num_key_value_heads=16, n_routed_experts=32, n_shared_experts=2, num_experts_per_tok=6,
    kv_lora_rank=256, q_lora_rank=None, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
    first_k_dense_replace=1, topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0,
    max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6,
)


# ---- checkpoints ----------------------------------------------------------------------------------
def build_llama(cache: Path) -> Path:
    from quant_memory_speed import build_checkpoint

    return build_checkpoint(cache / "llama-0.5b")


def build_moe(cache: Path) -> Path:
    """DeepSeek-V2-Lite's shape at ~0.5B, random bf16 weights (transformers' own initialisation)."""
    from quant_memory_speed import ensure_full_tokenizer

    path = cache / "deepseek-v2-lite-0.5b"
    if (path / "config.json").is_file():
        ensure_full_tokenizer(path, MOE_CONFIG["vocab_size"])
        return path
    import transformers

    torch.manual_seed(0)
    config = transformers.DeepseekV2Config(**MOE_CONFIG)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    ensure_full_tokenizer(path, MOE_CONFIG["vocab_size"])
    return path


def gguf_tokenizer_is_current(gguf_path: Path, hf_dir: Path) -> bool:
    """Whether the GGUF file's token list is the one hf_dir's tokenizer converts to (a GGUF written
    before the checkpoint's tokenizer was rewritten holds the old one)."""
    from gguf import GGUFReader
    from hf_to_gguf import token_list

    field = GGUFReader(str(gguf_path)).fields.get("tokenizer.ggml.tokens")
    if field is None:
        return False
    tokens = [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]
    vocab_size = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    return tokens == token_list(hf_dir, vocab_size)[0]


def build_gguf(hf_dir: Path, ftype: str) -> Path:
    out = hf_dir.parent / f"{hf_dir.name}-{ftype}.gguf"
    if out.is_file() and not gguf_tokenizer_is_current(out, hf_dir):
        print(f"{out.name} holds an older tokenizer than {hf_dir.name}'s; rebuilding it", flush=True)
        out.unlink()
    if not out.is_file():
        from hf_to_gguf import convert

        t0 = time.perf_counter()
        convert(hf_dir, out.with_suffix(".tmp"), ftype, return_weights=False)
        out.with_suffix(".tmp").rename(out)
        print(f"wrote {out.name} ({out.stat().st_size / 2**20:.0f} MiB, {time.perf_counter() - t0:.0f} s)", flush=True)
    return out


def ensure_llama_cpp(sdist: str | None) -> bool:
    """Import llama_cpp, building and installing llama-cpp-python first if it is missing."""
    try:
        importlib.import_module("llama_cpp")
        return True
    except ImportError:
        pass
    source = sdist if sdist and Path(sdist).is_file() else f"llama-cpp-python=={LLAMA_CPP_VERSION}"
    print(f"installing {source} (a C++ build: several minutes)", flush=True)
    env = dict(os.environ, CMAKE_ARGS=llama_cpp_cmake_args(), CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    done = subprocess.run([sys.executable, "-m", "pip", "install", source], env=env)
    if done.returncode:
        print("llama-cpp-python did not install: llama.cpp is left out", flush=True)
        return False
    importlib.invalidate_caches()
    importlib.import_module("llama_cpp")
    return True


# ---- engines --------------------------------------------------------------------------------------
@dataclass
class Contestant:
    model: str  # "llama" or "moe"
    engine: str  # shoal, transformers, llama.cpp
    weights: str  # bf16, int8, Q8_0, ...
    peer: str | None  # the llama.cpp weights it is compared with
    bytes_per_token: int = 0  # weight bytes read per decoded token
    params_per_token: int = 0  # parameters multiplied per token (prefill FLOPs / 2)
    run: object = None
    prefill: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.engine} {self.weights}"


def torch_weight_bytes(named, routed_share: float) -> int:
    """Weight bytes one token reads from named (name, tensor) pairs: the embedding table is skipped and
    routed experts count `routed_share` (top-k / experts) of theirs."""
    total = 0.0
    for name, t in named:
        if "embed_tokens" in name:
            continue
        total += t.numel() * t.element_size() * (routed_share if ".mlp.experts" in name else 1.0)
    return int(total)


def checkpoint_params(path: Path, routed_share: float) -> int:
    """Parameters one token multiplies by (the same count for every storage format), from the checkpoint."""
    from safetensors import safe_open

    total = 0.0
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                if "embed_tokens" in name:
                    continue
                numel = 1
                for dim in f.get_slice(name).get_shape():
                    numel *= dim
                total += numel * (routed_share if ".mlp.experts." in name else 1.0)
    return int(total)


def shoal_runner(path: Path, quant: str | None, args):
    from shoal import LLM, SamplingParams

    options = {"quant": quant} if quant else {}
    if quant == "int4":
        options["quant_group_size"] = 64
    llm = LLM(str(path), dtype="bfloat16", progress=False, max_model_len=args.prompt_len + args.new_tokens + 16,
              kv_cache_memory=256 << 20, max_num_seqs=1, enable_prefix_caching=False, **options)
    engine = llm.engine

    def run(prompt: list[int], new: int) -> tuple[float, float]:
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
        t0 = time.perf_counter()
        while not engine.step():
            pass  # a prompt longer than one chunk takes several steps before its first token
        t1 = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        return t1 - t0, time.perf_counter() - t1

    return llm.model, run


def hf_runner(path: Path, dtype: torch.dtype):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()

    def run(prompt: list[int], new: int) -> tuple[float, float]:
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(torch.tensor([prompt]), use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t1 = time.perf_counter()
            for _ in range(new - 1):
                nxt = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            return t1 - t0, time.perf_counter() - t1

    return model, run


def llama_cpp_runner(path: Path, args):
    import llama_cpp
    import numpy as np

    n_ctx = args.prompt_len + args.new_tokens + 16
    # n_batch = n_ctx: llama-cpp-python keeps n_batch rows of logits, indexed by position
    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=max(512, n_ctx), n_ubatch=512,
                          n_threads=args.threads, n_threads_batch=args.threads, verbose=False)

    def run(prompt: list[int], new: int) -> tuple[float, float]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t1 = time.perf_counter()
        for _ in range(new - 1):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        return t1 - t0, time.perf_counter() - t1

    return run


def gguf_weight_bytes(path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors if t.name != "token_embd.weight")


def contestants(args, cache: Path) -> list[Contestant]:
    out: list[Contestant] = []
    models = args.models.split(",")
    quants = {"bf16": None, "int8": "int8", "int4": "int4"}
    peers = {"bf16": "BF16", "int8": "Q8_0", "int4": "Q4_0"}
    for model in models:
        path = build_llama(cache) if model == "llama" else build_moe(cache)
        config = json.loads((path / "config.json").read_text())
        share = config.get("num_experts_per_tok", 1) / config.get("n_routed_experts", 1)
        params = checkpoint_params(path, share)
        has_peer = model == "llama" and args.llama_cpp
        for name, quant in quants.items():
            if name not in args.shoal_weights.split(","):
                continue
            module, run = shoal_runner(path, quant, args)
            c = Contestant(model, "shoal", name + (" g64" if name == "int4" else ""), peers[name] if has_peer else None)
            named = list(module.named_parameters()) + list(module.named_buffers())
            c.bytes_per_token = torch_weight_bytes([(n, t) for n, t in named if "rotary" not in n], share)
            c.params_per_token, c.run = params, run
            out.append(c)
            print(f"loaded {model} {c.label}: {c.bytes_per_token / 2**20:.0f} MiB read per token", flush=True)
        for dtype in args.hf_dtypes.split(","):
            if not dtype:
                continue
            module, run = hf_runner(path, getattr(torch, dtype))
            short = {"float32": "fp32", "bfloat16": "bf16"}[dtype]
            c = Contestant(model, "transformers", short, "BF16" if has_peer else None, run=run)
            c.bytes_per_token, c.params_per_token = torch_weight_bytes(module.named_parameters(), share), params
            out.append(c)
            print(f"loaded {model} {c.label}: {c.bytes_per_token / 2**20:.0f} MiB read per token", flush=True)
        if has_peer:
            for ftype in args.gguf_types.split(","):
                gguf_path = build_gguf(path, ftype)
                c = Contestant(model, "llama.cpp", ftype, ftype, run=llama_cpp_runner(gguf_path, args))
                c.bytes_per_token, c.params_per_token = gguf_weight_bytes(gguf_path), params
                out.append(c)
                print(f"loaded {model} {c.label}: {c.bytes_per_token / 2**20:.0f} MiB read per token", flush=True)
    return out


# ---- the run --------------------------------------------------------------------------------------
def measure_limits(threads: int) -> tuple[float, float]:
    from shoal.backends.cpu import CpuBackend
    from shoal.backends.measure import measure_bandwidth, measure_matmul

    backend = CpuBackend()
    # the matmul peak in the dtype this CPU computes natively: bf16 emulated on an AVX2-only CPU is a
    # poor yardstick and takes minutes to measure
    dtype = torch.bfloat16 if torch.bfloat16 in backend.native_dtypes() else torch.float32
    return measure_bandwidth(backend), measure_matmul(backend, dtype)


def table(results: list[Contestant], bandwidth: float, peak: float) -> tuple[str, list[dict]]:
    rows, records = [], []
    by_key = {(c.model, c.engine, c.weights): c for c in results}
    header = ("| model | engine | weights | MiB read / token | prefill tok/s | vs llama.cpp | vs limit "
              "| decode tok/s | vs llama.cpp | vs limit |")
    rows.append(header)
    rows.append("|---|---|---|---|---|---|---|---|---|---|")
    for c in results:
        pre, dec = statistics.median(c.prefill), statistics.median(c.decode)
        peer = by_key.get((c.model, "llama.cpp", c.peer)) if c.peer else None
        pre_limit = peak * 1e12 / (2 * c.params_per_token)
        dec_limit = bandwidth * 1e9 / c.bytes_per_token
        vs = (lambda mine, theirs: f"{mine / theirs:.2f}x") if peer else (lambda mine, theirs: "—")
        peer_pre = statistics.median(peer.prefill) if peer else None
        peer_dec = statistics.median(peer.decode) if peer else None
        rows.append(f"| {c.model} | {c.engine} | {c.weights} | {c.bytes_per_token / 2**20:.0f} | {pre:.0f} | "
                    f"{vs(pre, peer_pre)} | {pre / pre_limit:.2f} | {dec:.1f} | {vs(dec, peer_dec)} | {dec / dec_limit:.2f} |")
        records.append({
            "model": c.model, "engine": c.engine, "weights": c.weights, "peer": c.peer,
            "bytes_per_token": c.bytes_per_token, "params_per_token": c.params_per_token,
            "prefill_tok_s": c.prefill, "decode_tok_s": c.decode, "prefill_median": pre, "decode_median": dec,
            "prefill_limit": pre_limit, "decode_limit": dec_limit,
            "prefill_vs_peer": pre / peer_pre if peer else None, "decode_vs_peer": dec / peer_dec if peer else None,
        })
    return "\n".join(rows), records


def plot(records: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(records) + 2))
    labels = [f"{r['model']}: {r['engine']} {r['weights']}" for r in records][::-1]
    colors = {"shoal": "tab:blue", "transformers": "tab:gray", "llama.cpp": "tab:orange"}
    for ax, key, name in ((axes[0], "decode", "decode tok/s (batch 1)"), (axes[1], "prefill", "prefill tok/s")):
        values = [r[f"{key}_median"] for r in records][::-1]
        limits = [r[f"{key}_limit"] for r in records][::-1]
        ys = range(len(records))
        ax.barh(ys, values, color=[colors[r["engine"]] for r in records][::-1])
        ax.scatter(limits, ys, marker="|", s=200, color="black", label="this machine's limit")
        ax.set_yticks(list(ys), labels if ax is axes[0] else [""] * len(labels))
        ax.set_xlabel(name)
        ax.set_xscale("log")
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(textwrap.fill(title, 150), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "shoal-bench"))
    ap.add_argument("--models", default="llama,moe")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--shoal-weights", default="bf16,int8,int4")
    ap.add_argument("--hf-dtypes", default="float32", help="comma-separated; empty to leave transformers out")
    ap.add_argument("--gguf-types", default="BF16,Q8_0,Q4_0")
    ap.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false")
    ap.add_argument("--llama-cpp-sdist", default="/tmp/lcp/llama_cpp_python-0.3.36.tar.gz",
                    help="a llama-cpp-python source archive to build from if it is not installed (else PyPI)")
    ap.add_argument("--json-out", default="benchmarks/results_compare_cpu.json")
    ap.add_argument("--plot", default="benchmarks/compare_cpu.png")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.llama_cpp:
        args.llama_cpp = ensure_llama_cpp(args.llama_cpp_sdist)
    cache = Path(args.cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    results = contestants(args, cache)

    vocab = 32000
    gen = torch.Generator().manual_seed(0)
    for c in results:  # warm-up: first touch of every weight page, kernel selection
        c.run(torch.randint(3, vocab, (8,), generator=gen).tolist(), 4)
    bandwidths, peaks = [], []
    for r in range(args.rounds):
        bandwidth, peak = measure_limits(args.threads)
        bandwidths.append(bandwidth)
        peaks.append(peak)
        prompt = torch.randint(3, vocab, (args.prompt_len,), generator=gen).tolist()  # a new prompt each round
        order = results if r % 2 == 0 else results[::-1]
        for c in order:
            prefill_s, decode_s = c.run(prompt, args.new_tokens)
            c.prefill.append(args.prompt_len / prefill_s)
            c.decode.append((args.new_tokens - 1) / decode_s)
        print(f"round {r + 1}: {bandwidth:.1f} GB/s, {peak:.2f} TFLOP/s matmul; "
              + ", ".join(f"{c.model} {c.label} {c.decode[-1]:.1f}" for c in results) + " decode tok/s", flush=True)
    bandwidth, peak = statistics.median(bandwidths), statistics.median(peaks)
    text, records = table(results, bandwidth, peak)
    conditions = (f"{args.threads} threads, batch 1, {args.prompt_len}-token prompt, {args.new_tokens} new tokens, "
                  f"median of {args.rounds} alternating rounds; limits: {bandwidth:.1f} GB/s memory (copy), "
                  f"{peak:.2f} TFLOP/s matmul in the native dtype (medians of one measurement per round)")
    print()
    print(conditions)
    print(text)
    if args.json_out:
        payload = {"conditions": conditions, "threads": args.threads, "prompt_len": args.prompt_len,
                   "new_tokens": args.new_tokens, "bandwidth_gb_s": bandwidths, "bf16_tflops": peaks,
                   "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "results": records}
        Path(args.json_out).write_text(json.dumps(payload, indent=2) + "\n")
    if args.plot:
        plot(records, args.plot, conditions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
