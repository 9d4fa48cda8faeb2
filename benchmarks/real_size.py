"""Real sizes without downloads: random checkpoints with the exact configs of DeepSeek-V2-Lite (15.7B
parameters) and Llama-3.1-8B, loaded by shoal the way a downloaded model is, side by side with llama.cpp.

    python benchmarks/real_size.py [--dir /work/realsize] [--only llama-3.1-8b,deepseek-v2-lite] [--evict auto]
                                   [--quants int4,int8] [--layers N] [--vocab N] [--threads T] [--keep]
                                   [--json-out FILE]

What it writes (into --dir, outside the repository; never committed), streamed: one shard in memory at a
time (a shard is about --shard-gib; safetensors' writer copies it once more while writing), bf16
safetensors with one tensor per expert as the published checkpoints have them, config.json (the
published one; --layers / --vocab scale it down to validate the script) and a tokenizer with a token for
every id. The Llama folder is also converted to an F16 GGUF file one tensor at a time
(tests/gguf/hf_to_gguf.py: convert_streaming_f16), quantized to Q4_K_M by llama.cpp's own quantizer
(llama_cpp.llama_model_quantize) and the F16 file deleted. Written files are kept between runs and
skipped when their size matches the one recorded when they were written (sizes.json), so an
interrupted run resumes; without --keep the files of a model are deleted after it has been measured.

What it measures, each load in a fresh subprocess (so peak memory is the load's own):
  load s        LLM(...) from start to ready, the files evicted from the page cache first
  read s        reading the same files cold (evicted again first): the floor a load cannot beat
  peak RSS      VmHWM of the subprocess after loading and running (mmapped file pages included), and
                the peak of its anonymous memory while loading (RssAnon, sampled), against the loaded weight bytes
                (parameters and buffers of the model shoal built); the KV pool it chose is in the JSON
  prefill       tokens/s of one --prompt-len prompt (time to its first token)
  decode b1     tokens/s of one request after its first token
  decode b32    tokens/s of 32 requests decoded together, after all have their first token
  limit         decode b1 against memory bandwidth (shoal doctor's copy benchmark, measured here) /
                the weight bytes one token reads (every weight but the embedding table; routed experts
                top-k / experts of theirs)
llama.cpp (llama-cpp-python, the same threads) runs the same GGUF file: batch 1 through Llama.eval, 32
sequences through llama_decode with one token of each sequence per batch.

The page cache is emptied with /proc/sys/vm/drop_caches where this process may write it (root), else
each file's pages are dropped with posix_fadvise(DONTNEED) after an fsync (which needs no privilege and
leaves other processes' caches alone); the table says which was used.

Before loading, a model whose footprint (the weights as shoal will hold them — the loader's own model,
built on the meta device with the same quantization plan — plus 2 GiB for the KV pool and the runtime)
exceeds MemAvailable is refused with the numbers, instead of being killed by the kernel.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "gguf"))

GIB = 1 << 30
CONCURRENT = 32

# DeepSeek-V2-Lite's published config.json (deepseek-ai/DeepSeek-V2-Lite), the fields shoal reads.
DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "attention_bias": False,
    "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": 2048, "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64,
    "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6,
    "num_hidden_layers": 27, "num_key_value_heads": 16, "q_lora_rank": None, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "tie_word_embeddings": False,
    "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16", "v_head_dim": 128, "vocab_size": 102400,
}
MODELS = {
    # name: (config, shard bytes as published: Llama-3.1-8B in ~5 GB files, DeepSeek-V2-Lite in ~4 GiB files).
    # Llama first: its F16 GGUF intermediate (16 GB, deleted once quantized) then never sits beside the
    # DeepSeek files, so even with --keep the disk holds at most ~52 GB (16 + 4.9 + 31.4).
    "llama-3.1-8b": (json.loads((ROOT / "shoal/planner/models/llama-3.1-8b/config.json").read_text()), 5_000_000_000),
    "deepseek-v2-lite": (DEEPSEEK_V2_LITE, 4 * GIB),
}


# ---- the checkpoint's tensors -----------------------------------------------------------------------
def tensor_plan(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor in the published checkpoint's order and naming."""
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    out = [("model.embed_tokens.weight", (cfg["vocab_size"], h))]

    def mlp(prefix: str, inter: int) -> None:
        out.extend([(f"{prefix}.gate_proj.weight", (inter, h)), (f"{prefix}.up_proj.weight", (inter, h)),
                    (f"{prefix}.down_proj.weight", (h, inter))])

    for i in range(layers):
        p = f"model.layers.{i}"
        out.append((f"{p}.input_layernorm.weight", (h,)))
        if cfg["model_type"] == "deepseek_v2":
            heads, nope, rope, v = (cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"],
                                    cfg["v_head_dim"])
            rank = cfg["kv_lora_rank"]
            out += [(f"{p}.self_attn.q_proj.weight", (heads * (nope + rope), h)),
                    (f"{p}.self_attn.kv_a_proj_with_mqa.weight", (rank + rope, h)),
                    (f"{p}.self_attn.kv_a_layernorm.weight", (rank,)),
                    (f"{p}.self_attn.kv_b_proj.weight", (heads * (nope + v), rank)),
                    (f"{p}.self_attn.o_proj.weight", (h, heads * v))]
            out.append((f"{p}.post_attention_layernorm.weight", (h,)))
            if i < cfg["first_k_dense_replace"]:
                mlp(f"{p}.mlp", cfg["intermediate_size"])
            else:
                out.append((f"{p}.mlp.gate.weight", (cfg["n_routed_experts"], h)))
                for e in range(cfg["n_routed_experts"]):
                    mlp(f"{p}.mlp.experts.{e}", cfg["moe_intermediate_size"])
                mlp(f"{p}.mlp.shared_experts", cfg["moe_intermediate_size"] * cfg["n_shared_experts"])
        else:
            heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
            d = h // heads
            out += [(f"{p}.self_attn.q_proj.weight", (heads * d, h)), (f"{p}.self_attn.k_proj.weight", (kv * d, h)),
                    (f"{p}.self_attn.v_proj.weight", (kv * d, h)), (f"{p}.self_attn.o_proj.weight", (h, heads * d))]
            out.append((f"{p}.post_attention_layernorm.weight", (h,)))
            mlp(f"{p}.mlp", cfg["intermediate_size"])
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (cfg["vocab_size"], h))]
    return out


def shards(plan: list[tuple[str, tuple[int, ...]]], shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensors grouped into files of at most shard_bytes (bf16), in order, as save_pretrained cuts them."""
    groups, size = [[]], 0
    for name, shape in plan:
        n = math.prod(shape) * 2
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += n
    return groups


def _random(name: str, shape: tuple[int, ...], seed: int):
    import torch

    if len(shape) == 1:  # norms as trained models have them: near one
        return torch.ones(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    std = 0.02 if "embed" in name or "lm_head" in name else 1.0 / math.sqrt(shape[1])
    return (torch.randn(shape, generator=g) * std).to(torch.bfloat16)


def write_checkpoint(name: str, cfg: dict, folder: Path, shard_bytes: int) -> Path:
    """The checkpoint folder, each shard written (or skipped if already there at its recorded size) on its own."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from checkpoints import tokenizer_has_full_vocab, write_full_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    if not tokenizer_has_full_vocab(folder, cfg["vocab_size"]):
        write_full_tokenizer(folder, cfg["vocab_size"])
    sizes_file = folder / "sizes.json"
    sizes = json.loads(sizes_file.read_text()) if sizes_file.is_file() else {}
    groups = shards(tensor_plan(cfg), shard_bytes)
    index, seed = {}, 0
    total = sum(math.prod(s) * 2 for g in groups for _, s in g)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {name}") as bar:
        for k, group in enumerate(groups):
            file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
            index.update({n: file for n, _ in group})
            path = folder / file
            nbytes = sum(math.prod(s) * 2 for _, s in group)
            if path.is_file() and sizes.get(file) == path.stat().st_size:
                seed += len(group)
                bar.update(nbytes)
                continue
            tensors = {}
            for tensor_name, shape in group:
                tensors[tensor_name] = _random(tensor_name, shape, seed)
                seed += 1
            tmp = path.with_suffix(".tmp")
            save_file(tensors, str(tmp), metadata={"format": "pt"})
            del tensors
            tmp.rename(path)
            sizes[file] = path.stat().st_size
            sizes_file.write_text(json.dumps(sizes, indent=1))
            bar.update(nbytes)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1))
    return folder


def write_q4_k_m(folder: Path, threads: int) -> Path:
    """folder's Q4_K_M GGUF by llama.cpp's quantizer, from an F16 GGUF written one tensor at a time (deleted)."""
    import llama_cpp

    from hf_to_gguf import convert_streaming_f16

    out = folder.parent / f"{folder.name}-Q4_K_M.gguf"
    sizes_file = folder / "sizes.json"
    sizes = json.loads(sizes_file.read_text())
    if out.is_file() and sizes.get(out.name) == out.stat().st_size:
        return out
    f16 = folder.parent / f"{folder.name}-F16.gguf"
    t0 = time.perf_counter()
    if not (f16.is_file() and sizes.get(f16.name) == f16.stat().st_size):
        convert_streaming_f16(folder, f16.with_suffix(".tmp"))
        f16.with_suffix(".tmp").rename(f16)
        sizes[f16.name] = f16.stat().st_size
        sizes_file.write_text(json.dumps(sizes, indent=1))
    print(f"wrote {f16.name} ({f16.stat().st_size / GIB:.1f} GiB, {time.perf_counter() - t0:.0f} s)", flush=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = threads
    t0 = time.perf_counter()
    tmp = out.with_suffix(".tmp")
    code = llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), ctypes.byref(params))
    if code != 0:
        raise SystemExit(f"llama_model_quantize(Q4_K_M) failed with {code}; is there room on {out.parent}?")
    tmp.rename(out)
    sizes[out.name] = out.stat().st_size
    f16.unlink()  # the intermediate is the model's size again: free the disk
    sizes.pop(f16.name, None)
    sizes_file.write_text(json.dumps(sizes, indent=1))
    print(f"wrote {out.name} ({out.stat().st_size / GIB:.1f} GiB, {time.perf_counter() - t0:.0f} s)", flush=True)
    return out


# ---- page cache, memory ----------------------------------------------------------------------------
def model_files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(path.glob("*.safetensors"))


def evict(files: list[Path], how: str = "auto") -> str:
    """Empty the page cache of `files` (how: "auto" tries drop_caches first, "fadvise" only drops these
    files' pages); returns how it was done."""
    if how == "auto":
        try:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return "drop_caches"
        except OSError:
            pass
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise"


def cold_read_seconds(files: list[Path], how: str) -> float:
    evict(files, how)
    buf = bytearray(64 << 20)
    t0 = time.perf_counter()
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


def mem_available() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def vm_hwm() -> int:
    """Peak resident memory, file pages included (mmapped safetensors / GGUF pages count while touched)."""
    return _status("VmHWM")


class PeakAnon:
    """Peak anonymous resident memory (RssAnon: what the process itself allocated, without file pages the
    kernel can drop), sampled every 20 ms on a thread while loading: Linux keeps no peak of it. Stopped
    before anything is timed: a thread waking beside the kernels' worker threads slows decode many-fold
    on a busy machine."""

    def __init__(self) -> None:
        import threading

        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _status("RssAnon"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status("RssAnon"))


def expected_weight_bytes(path: Path, quant: str | None, dtype: str | None = None) -> int:
    """The bytes of the weights shoal will hold, from the loader itself: the model it would load, built on
    the meta device (no memory) with the same quantization plan (a GGUF file's: shoal.gguf.loader) and
    compute dtype (None: shoal's choice)."""
    import torch

    from shoal.backends import get_backend
    from shoal.construct import choose_dtype, construct_model
    from shoal.models.hf_config import load_model_config
    from shoal.quant.plan import plan_quantization

    backend = get_backend("cpu")
    if path.is_file():
        from shoal.gguf.loader import gguf_quant_plan, open_gguf_model

        gguf = open_gguf_model(path, backend)
        config, plan = gguf.config, gguf_quant_plan(gguf, backend, quant, None, prepare=False)
    else:
        config = load_model_config(path)
        plan = plan_quantization(config, backend, quant, 64 if quant == "int4" else None, prepare=False)
    compute = choose_dtype(config, backend, getattr(torch, dtype) if dtype else None)
    model = construct_model(config, backend, torch.device("meta"), compute, plan)
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


# ---- the measured runs (each in its own subprocess) ---------------------------------------------------
def run_worker(spec: dict) -> dict:
    """Spawn this script as a worker for `spec`; its last stdout line is the JSON result."""
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode:
        return {"error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def shoal_worker(spec: dict) -> dict:
    import torch

    from compare_cpu import torch_weight_bytes
    from shoal import LLM, SamplingParams

    torch.set_num_threads(spec["threads"])
    options = {"quant": spec["quant"], "quant_group_size": 64 if spec["quant"] == "int4" else None} if spec["quant"] else {}
    anon = PeakAnon()
    t0, cpu0 = time.perf_counter(), time.process_time()
    llm = LLM(spec["path"], dtype=spec["dtype"], progress=False, max_model_len=spec["max_len"],
              max_num_seqs=CONCURRENT, enable_prefix_caching=False, **options)
    load_s, load_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    anon_peak, hwm_load = anon.stop(), vm_hwm()
    named = [(n, t) for n, t in list(llm.model.named_parameters()) + list(llm.model.named_buffers()) if "rotary" not in n]
    weight_bytes = sum(t.numel() * t.element_size() for _, t in named)
    cfg = llm.model_config.moe
    share = cfg.experts_per_token / cfg.num_experts if cfg is not None else 1.0
    engine = llm.engine

    def timed(prompts: list[list[int]], new: int) -> tuple[float, float, int]:
        seqs = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)) for p in prompts]
        t0 = time.perf_counter()
        while not all(s.output_ids for s in seqs):
            engine.step()
        t1 = time.perf_counter()
        first = sum(len(s.output_ids) for s in seqs)
        while engine.has_unfinished():
            engine.step()
        return t1 - t0, time.perf_counter() - t1, sum(len(s.output_ids) for s in seqs) - first

    prompt = torch.randint(3, llm.model_config.vocab_size, (spec["prompt_len"],), generator=torch.Generator().manual_seed(0)).tolist()
    timed([prompt[:8]], 4)  # warm up
    ttft, decode_s, decoded = timed([prompt], spec["new_tokens"])
    short = torch.randint(3, llm.model_config.vocab_size, (CONCURRENT, 16), generator=torch.Generator().manual_seed(1))
    _, decode32_s, decoded32 = timed(short.tolist(), spec["new_tokens"])
    return {"load_s": load_s, "load_cpu_s": load_cpu_s, "weight_bytes": weight_bytes,
            "active_bytes": torch_weight_bytes(named, share), "anon_peak": anon_peak, "anon_end": _status("RssAnon"),
            "dtype": str(llm.dtype).removeprefix("torch."), "kv_bytes": llm.kv_pool.bytes, "kv_reason": llm.kv_pool.reason, "hwm_load": hwm_load,
            "hwm": vm_hwm(), "prefill_tps": spec["prompt_len"] / ttft, "decode_tps": decoded / decode_s,
            "decode32_tps": decoded32 / decode32_s}


def llama_cpp_worker(spec: dict) -> dict:
    """llama.cpp through llama-cpp-python's C API: one context with a KV cell range per sequence; batch 1 is
    sequence 0 alone, then 32 sequences with one token of each per llama_decode."""
    import llama_cpp
    import numpy as np

    from compare_cpu import gguf_weight_bytes

    quiet = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    llama_cpp.llama_log_set(quiet, ctypes.c_void_p())
    anon = PeakAnon()
    t0, cpu0 = time.perf_counter(), time.process_time()
    model = llama_cpp.llama_model_load_from_file(spec["path"].encode(), llama_cpp.llama_model_default_params())
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_seq_max = spec["max_len"] * CONCURRENT, CONCURRENT
    params.n_batch = params.n_ubatch = 512
    params.n_threads = params.n_threads_batch = spec["threads"]
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not model or not ctx:
        raise RuntimeError(f"llama.cpp could not load {spec['path']}")
    load_s, load_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    anon_peak = anon.stop()
    vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    batch = llama_cpp.llama_batch_init(max(spec["prompt_len"], CONCURRENT), 0, CONCURRENT)

    def decode(entries: list[tuple[int, int, int, bool]]) -> None:  # (token, position, sequence, wants logits)
        batch.n_tokens = len(entries)
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
            batch.seq_id[i][0] = seq
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def argmax(i: int) -> int:
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(vocab,))))

    def prefill(prompt: list[int], seq: int) -> int:
        decode([(t, j, seq, j == len(prompt) - 1) for j, t in enumerate(prompt)])
        return argmax(len(prompt) - 1)

    def clear() -> None:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)

    prompt = np.random.default_rng(0).integers(3, vocab, spec["prompt_len"]).tolist()
    new = spec["new_tokens"]
    prefill(prompt[:8], 0)  # warm up
    clear()
    t0 = time.perf_counter()
    tok = prefill(prompt, 0)
    t1 = time.perf_counter()
    for step in range(new - 1):
        decode([(tok, len(prompt) + step, 0, True)])
        tok = argmax(0)
    decode_tps = (new - 1) / (time.perf_counter() - t1)
    ttft = t1 - t0
    clear()
    short = np.random.default_rng(1).integers(3, vocab, (CONCURRENT, 16)).tolist()  # 16 tokens each, as shoal's
    tokens = [prefill(short[s], s) for s in range(CONCURRENT)]
    t1 = time.perf_counter()
    for step in range(new - 1):
        decode([(tokens[s], 16 + step, s, True) for s in range(CONCURRENT)])
        tokens = [argmax(s) for s in range(CONCURRENT)]
    decode32_tps = CONCURRENT * (new - 1) / (time.perf_counter() - t1)
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return {"load_s": load_s, "load_cpu_s": load_cpu_s, "weight_bytes": Path(spec["path"]).stat().st_size,
            "active_bytes": gguf_weight_bytes(Path(spec["path"])), "hwm": vm_hwm(), "hwm_load": None,
            "anon_peak": anon_peak, "anon_end": _status("RssAnon"),
            "prefill_tps": spec["prompt_len"] / ttft, "decode_tps": decode_tps, "decode32_tps": decode32_tps}


def worker_main(spec: dict) -> None:
    files = model_files(Path(spec["path"]))
    spec["cache"] = evict(files, spec["evict"])
    result = (llama_cpp_worker if spec["engine"] == "llama.cpp" else shoal_worker)(spec)
    print(json.dumps(dict(result, cache=spec["cache"])), flush=True)


# ---- the run -----------------------------------------------------------------------------------------
def measure(label: str, engine: str, path: Path, quant: str | None, args, bandwidth: float) -> dict:
    files = model_files(path)
    file_bytes = sum(f.stat().st_size for f in files)
    row = {"model": label, "engine": engine, "weights": quant or ("Q4_K_M" if path.is_file() else "bf16"),
           "file_bytes": file_bytes}
    if engine == "shoal":
        expected = row["expected_weight_bytes"] = expected_weight_bytes(
            path, quant, None if args.dtype == "auto" else args.dtype)
        need = expected + 2 * GIB  # the KV pool (small at these context lengths) and the runtime: 2 GiB
        free = mem_available()
        if need > free:
            print(f"{label} {row['weights']}: refused: needs about {need / GIB:.1f} GiB (weights as shoal holds them "
                  f"{expected / GIB:.1f} GiB + KV pool and runtime 2 GiB) but {free / GIB:.1f} GiB is available; "
                  "free memory, or measure less (--quants int4, or --layers)", flush=True)
            return dict(row, refused=f"needs ~{need / GIB:.1f} GiB, {free / GIB:.1f} GiB available")
    row["read_s"] = cold_read_seconds(files, args.evict)
    spec = {"engine": engine, "path": str(path), "quant": quant, "threads": args.threads, "evict": args.evict,
            "dtype": None if args.dtype == "auto" else args.dtype,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "max_len": args.prompt_len + args.new_tokens + 16}
    result = run_worker(spec)
    row.update(result)
    if "error" not in result:
        row["limit_tps"] = bandwidth * 1e9 / result["active_bytes"]
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict], bandwidth: float, cpu: str, threads: int) -> str:
    lines = [f"CPU: {cpu}, {threads} threads; memory bandwidth {bandwidth:.1f} GB/s (copy, read + write)", "",
             "| model | engine | weights | files GiB | load s (CPU s) | cold read s | load / read | loaded weights GiB | "
             "peak RSS GiB | peak anon (load) GiB | anon / weights | prefill tok/s | decode b1 tok/s | of limit | "
             "decode b32 tok/s | b1 vs llama.cpp |", "|" + "---|" * 16]
    peers = {r["model"]: r for r in rows if r["engine"] == "llama.cpp" and "decode_tps" in r}
    for r in rows:
        weights = r["weights"] + (f" ({r['dtype']})" if r.get("dtype") else "")
        head = f"| {r['model']} | {r['engine']} | {weights} | {r['file_bytes'] / GIB:.1f} |"
        if "refused" in r or "error" in r:
            error = (r.get("error") or "").strip().splitlines()
            why = r.get("refused") or "failed: " + (error[-1] if error else "the worker died without a word (killed: see dmesg)")
            lines.append(head + f" {why} |" + " |" * 11)
            continue
        peer = peers.get(r["model"]) if r["engine"] == "shoal" and r["weights"] == "Q4_K_M" else None
        vs = f"{r['decode_tps'] / peer['decode_tps']:.2f}x" if peer else ""
        lines.append(
            head + f" {r['load_s']:.1f} ({r['load_cpu_s']:.1f}) | {r['read_s']:.1f} | {r['load_s'] / r['read_s']:.2f} | "
            f"{r['weight_bytes'] / GIB:.2f} | {r['hwm'] / GIB:.2f} | {r['anon_peak'] / GIB:.2f} | "
            f"{r['anon_peak'] / r['weight_bytes']:.2f} | "
            f"{r['prefill_tps']:.1f} | {r['decode_tps']:.2f} | {r['decode_tps'] / r['limit_tps']:.2f} | "
            f"{r['decode32_tps']:.1f} | {vs} |")
    caches = sorted({r.get("cache") for r in rows if r.get("cache")})
    lines += ["", f"page cache emptied with: {', '.join(caches) or 'n/a'}; peak RSS is VmHWM, which counts the "
              "mmapped files' pages while they are touched (llama.cpp keeps its GGUF mmapped: its weights are "
              "file pages); peak anon is the peak of RssAnon while loading, what the process allocated itself "
              "(the KV pool included; its size and RssAnon after the runs are in the JSON); loaded weights "
              "for llama.cpp is the file's size; 'of limit' = decode b1 / (bandwidth / weight bytes one token "
              "reads); load CPU s is the loading process's CPU time (on a shared machine, wall time also waits "
              "for other processes)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/work/realsize", help="where the checkpoints are written (outside the repo)")
    parser.add_argument("--only", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--quants", default="int4,int8", help="shoal's --quant for the safetensors checkpoints")
    parser.add_argument("--layers", type=int, default=0, help="scale: keep this many decoder layers (0: all)")
    parser.add_argument("--vocab", type=int, default=0, help="scale: this vocabulary size (0: the published one)")
    parser.add_argument("--shard-gib", type=float, default=0, help="shard size (0: as published)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--dtype", default="auto", help="shoal's compute dtype (auto: shoal's choice for this CPU, as "
                        "a user gets it: bfloat16 where the CPU has native bf16, else float32)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--evict", choices=("auto", "fadvise"), default="auto",
                        help="how the page cache is emptied: auto (drop_caches where allowed, else fadvise) or "
                             "fadvise (only the model's files: leaves other processes' caches alone)")
    parser.add_argument("--llama-cpp-sdist", help="llama-cpp-python sdist to build if it is not installed")
    parser.add_argument("--keep", action="store_true", help="keep the written files after measuring")
    parser.add_argument("--json-out", help="write the rows as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0
    import shutil

    import torch

    from compare_cpu import ensure_llama_cpp
    from shoal.backends.cpu import CpuBackend
    from shoal.backends.measure import measure_bandwidth

    torch.set_num_threads(args.threads)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    bandwidth = measure_bandwidth(CpuBackend())
    base = Path(args.dir)
    rows = []

    def save() -> None:  # after every row, so a run cut short keeps what it measured
        if args.json_out:
            Path(args.json_out).write_text(json.dumps({"cpu": cpu, "threads": args.threads, "bandwidth_gbps": bandwidth,
                                                       "rows": rows}, indent=1))

    for name in args.only.split(","):
        cfg, shard_bytes = MODELS[name]
        cfg = dict(cfg)
        if args.layers:
            cfg["num_hidden_layers"] = args.layers
        if args.vocab:
            cfg["vocab_size"] = args.vocab
        label = name if not (args.layers or args.vocab) else f"{name} ({cfg['num_hidden_layers']} layers, vocab {cfg['vocab_size']})"
        folder = base / (name if label == name else f"{name}-L{cfg['num_hidden_layers']}-V{cfg['vocab_size']}")
        write_checkpoint(name, cfg, folder, int(args.shard_gib * GIB) if args.shard_gib else shard_bytes)
        for quant in args.quants.split(","):
            rows.append(measure(label, "shoal", folder, quant, args, bandwidth))
            save()
        gguf_path = None
        if cfg["model_type"] == "llama" and ensure_llama_cpp(args.llama_cpp_sdist):
            gguf_path = write_q4_k_m(folder, args.threads)
            rows.append(measure(label, "shoal", gguf_path, None, args, bandwidth))
            save()
            rows.append(measure(label, "llama.cpp", gguf_path, None, args, bandwidth))
            save()
        if not args.keep:
            shutil.rmtree(folder)
            if gguf_path is not None:
                gguf_path.unlink()
    print()
    print(table(rows, bandwidth, cpu, args.threads))
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
