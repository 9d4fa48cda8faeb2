"""Accuracy of shoal's weight formats on the bundled demo model and held-out text.

Held-out text: the last 2% of the documents `scripts/train_demo_model.py` builds its corpus from
(CPython's pydoc topics and standard-library docstrings) — the split that script holds out and never
trains on. The stream is cut into windows of --window tokens; each format's perplexity is
exp(mean next-token NLL) over every position, and its next-token agreement is the share of positions
where its top-1 token equals the full-precision model's.

    python benchmarks/quant_accuracy.py [--dtype float32] [--max-tokens 32768] [--json-out FILE]

The rows are VARIANTS below: the weight formats, and the 8-bit KV caches (`--kv-cache-dtype int8|fp8`),
which run the full-precision weights over the engine's paged cache with 8-bit entries.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shoal.backends import get_backend  # noqa: E402
from shoal.config import DEMO_MODEL_PATH  # noqa: E402
from shoal.loader import build_model  # noqa: E402


@dataclass
class Variant:
    name: str
    load_options: dict  # build_model keyword arguments (quant, quant_group_size, ...)
    # (model, batch, length, dtype) -> cache; None: the model's own make_cache. The int8 KV row plugs in here.
    cache_factory: Callable | None = None


VARIANTS = [
    Variant("full precision", {}),
    Variant("int8 (per channel)", {"quant": "int8"}),
    Variant("int4 (group 32)", {"quant": "int4", "quant_group_size": 32}),
    Variant("int4 (group 64)", {"quant": "int4", "quant_group_size": 64}),
    Variant("int4 (group 128)", {"quant": "int4", "quant_group_size": 128}),
    Variant("fp8 (128x128 blocks)", {"quant": "fp8"}),
    Variant("int8 KV cache", {}, cache_factory=lambda m, b, n, d: paged_cache(m, b, n, d, "int8")),
    Variant("fp8 KV cache", {}, cache_factory=lambda m, b, n, d: paged_cache(m, b, n, d, "fp8")),
]


def paged_cache(model, batch: int, length: int, dtype, kv_quant: str):
    """The engine's paged KV cache with 8-bit entries, laid out for `batch` sequences of `length` tokens
    computed in one packed step (sequence i owns blocks i*blocks .. (i+1)*blocks - 1)."""
    from shoal.layers.paged_kv_cache import PagedBatch, PagedKVCache

    block = 16
    blocks = -(-length // block)
    cache = PagedKVCache(model.config.num_hidden_layers, batch * blocks, block, model.cache_entry_shapes(), dtype,
                         "cpu", kv_quant)
    slots = torch.arange(batch * blocks * block).view(batch, -1)[:, :length]
    cache.set_batch(PagedBatch(slots.flatten(), slots, torch.full((batch,), length)))
    return cache


def held_out_ids(tokenizer_dir: Path, max_tokens: int) -> torch.Tensor:
    """The demo model's held-out documents, encoded as training encoded them (<bos> doc <eos> ...)."""
    spec = importlib.util.spec_from_file_location("train_demo_model", ROOT / "scripts" / "train_demo_model.py")
    trainer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trainer)
    docs = trainer.stdlib_documents()
    n_val = max(1, len(docs) // 50)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    ids = trainer.encode_docs(tok, docs[-n_val:])
    return ids[:max_tokens]


def evaluate(model, ids: torch.Tensor, window: int, batch: int, dtype, cache_factory) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-position NLL, per-position argmax) over the stream, in windows of `window` tokens."""
    n = (ids.numel() // window) * window
    rows = ids[:n].view(-1, window)
    nll, top = [], []
    with torch.inference_mode():
        for start in range(0, rows.shape[0], batch):
            x = rows[start : start + batch]
            b = x.shape[0]
            cache = cache_factory(model, b, window, dtype) if cache_factory else model.make_cache(b, window, dtype, "cpu")
            positions = torch.arange(window)[None].expand(b, window)
            if hasattr(cache, "set_batch"):  # the paged cache runs a packed step: [1, b * window]
                hidden = model(x.reshape(1, -1), positions.reshape(1, -1), cache).view(b, window, -1)
            else:
                hidden = model(x, positions, cache)
            logits = model.compute_logits(hidden)[:, :-1]
            target = x[:, 1:]
            nll.append(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                         reduction="none"))
            top.append(logits.argmax(-1).reshape(-1))
    return torch.cat(nll), torch.cat(top)


def through_decode_kernels() -> None:
    """Make prefill windows take decode's path: shoal's CPU matrix-vector kernels, 8 rows per call."""
    from shoal.backends.cpu import gemv as cpu_gemv

    if not cpu_gemv.available():
        raise SystemExit("--decode-kernels: shoal's CPU kernels could not be built here (no C compiler?)")
    accepts = cpu_gemv.accepts

    def chunked(kernel):
        return lambda x, *rest: torch.cat([kernel(part, *rest) for part in x.split(cpu_gemv.MAX_ROWS)])

    cpu_gemv.accepts = lambda x, k: accepts(x[: cpu_gemv.MAX_ROWS], k)
    cpu_gemv.gemv_int8 = chunked(cpu_gemv.gemv_int8)
    cpu_gemv.gemv_int4 = chunked(cpu_gemv.gemv_int4)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEMO_MODEL_PATH))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    ap.add_argument("--max-tokens", type=int, default=32768, help="held-out tokens evaluated at most")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--decode-kernels", action="store_true",
                    help="send every quantized matmul through the CPU decode kernels, 8 rows at a time "
                         "(with bf16 they multiply int8-quantized activations, as in real decode steps)")
    args = ap.parse_args(argv)
    if args.decode_kernels:
        through_decode_kernels()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    path = Path(args.model)
    ids = held_out_ids(path, args.max_tokens)
    backend = get_backend("cpu")
    results, reference = [], None
    for variant in VARIANTS:
        t0 = time.perf_counter()
        model, _, _ = build_model(path, backend, torch.device("cpu"), dtype, progress=False, **variant.load_options)
        nll, top = evaluate(model, ids, args.window, args.batch, dtype, variant.cache_factory)
        if reference is None:
            reference = (nll, top)
        ppl = math.exp(nll.mean().item())
        row = {
            "format": variant.name,
            "perplexity": ppl,
            "perplexity_change": ppl / math.exp(reference[0].mean().item()) - 1,
            "next_token_agreement": (top == reference[1]).float().mean().item(),
            "tokens": int(nll.numel()),
            "seconds": time.perf_counter() - t0,
        }
        results.append(row)
        print(f"{row['format']:<22} ppl {ppl:8.4f} ({row['perplexity_change'] * 100:+6.2f}%)  "
              f"agreement {row['next_token_agreement'] * 100:6.2f}%  [{row['seconds']:.0f} s]", flush=True)
    print()
    print(f"| format | perplexity | change | next-token agreement |  ({results[0]['tokens']} held-out tokens, {args.dtype})")
    print("|---|---|---|---|")
    for row in results:
        print(f"| {row['format']} | {row['perplexity']:.3f} | {row['perplexity_change'] * 100:+.2f}% | "
              f"{row['next_token_agreement'] * 100:.2f}% |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"dtype": args.dtype, "window": args.window,
                                                   "decode_kernels": args.decode_kernels, "results": results},
                                                  indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
