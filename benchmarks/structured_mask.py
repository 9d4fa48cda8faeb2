"""Structured outputs' cost per decode step: the grammar libraries shoal could use (llguidance, xgrammar) side
by side, each computing the allowed-token mask of B sequences and advancing them by one token, over the demo
model's vocabulary (4,096) and a 128k one; then shoal's whole path (token_mask + apply_token_mask on logits).

Each sequence walks the tokens of one valid reply to a JSON schema, so every step is a real mask. Figures are
medians over the steps, in CPU time of this process (the machine may be shared: wall time is printed too).

    python benchmarks/structured_mask.py                      # demo vocabulary + a 128k BPE trained here
    python benchmarks/structured_mask.py --tokenizer DIR/tokenizer.json   # a real checkpoint's, e.g. Llama 3's

The 128k vocabulary, when no --tokenizer is given, is a byte-level BPE trained on the Python sources installed
beside this interpreter (about a minute, cached in the temp directory): real checkpoints' vocabularies differ,
but the mask's cost follows the vocabulary's size and its token trie, which a BPE of that size has.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z0-9.]+@[a-z0-9]+\\.[a-z]{2,4}$"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 8},
        "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["street", "city", "zip"], "additionalProperties": False},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "tags", "address", "active"],
    "additionalProperties": False,
}
REPLY = {"name": "Ada Lovelace", "age": 36, "email": "ada.lovelace@example.org",
         "tags": ["mathematics", "engines", "poetry"],
         "address": {"street": "12 St James's Square", "city": "London", "zip": "12345"}, "active": True}


def synthetic_128k() -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = Path(tempfile.gettempdir()) / "shoal-bench-bpe-128k.json"
    if path.is_file():
        return path
    files = sorted(glob.glob(sys.prefix + "/lib/python3*/site-packages/**/*.py", recursive=True))

    def texts():
        total = 0
        for f in files:
            try:
                text = Path(f).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            total += len(text)
            yield text
            if total > 60_000_000:
                return

    print("training a 128k byte-level BPE on installed Python sources (once; cached) ...", flush=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=128000, special_tokens=["<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts(), trainer)
    tok.save(str(path))
    return path


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def bench_llguidance(tokenizer_json: str, eos: int, vocab: int, tokens: list[int], batch: int) -> dict:
    import llguidance as llg
    import numpy as np

    tok = llg.LLTokenizer(tokenizer_json, n_vocab=vocab, eos_token=eos)
    start = time.process_time()
    grammar = llg.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    prototype = llg.LLMatcher(tok, grammar, log_level=0)
    compile_s = time.process_time() - start
    matchers = [prototype.deep_copy() for _ in range(batch)]
    bits = np.zeros((batch, -(-vocab // 32)), dtype=np.int32)
    mask_cpu, mask_wall, advance = [], [], []
    for token in tokens:
        c, w = time.process_time(), time.perf_counter()
        for row, m in enumerate(matchers):
            m.unsafe_compute_mask_ptr(bits[row].ctypes.data, bits[row].nbytes)
        mask_cpu.append(time.process_time() - c)
        mask_wall.append(time.perf_counter() - w)
        c = time.process_time()
        for m in matchers:
            assert m.consume_token(token), m.get_error()
        advance.append(time.process_time() - c)
    return {"compile_ms": compile_s * 1e3, "mask_ms": median_ms(mask_cpu), "mask_wall_ms": median_ms(mask_wall),
            "advance_ms": median_ms(advance)}


def bench_xgrammar(tokenizer_json: str, vocab: int, tokens: list[int], batch: int) -> dict | None:
    try:
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        return None
    from tokenizers import Tokenizer

    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json), eos_token="<|eos|>")
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    start = time.process_time()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
    compile_s = time.process_time() - start
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
    bits = xgr.allocate_token_bitmask(batch, vocab)
    mask_cpu, mask_wall, advance = [], [], []
    for token in tokens:
        c, w = time.process_time(), time.perf_counter()
        for row, m in enumerate(matchers):
            m.fill_next_token_bitmask(bits, row)
        mask_cpu.append(time.process_time() - c)
        mask_wall.append(time.perf_counter() - w)
        c = time.process_time()
        for m in matchers:
            assert m.accept_token(token)
        advance.append(time.process_time() - c)
    return {"compile_ms": compile_s * 1e3, "mask_ms": median_ms(mask_cpu), "mask_wall_ms": median_ms(mask_wall),
            "advance_ms": median_ms(advance)}


def bench_shoal(tokenizer_json: str, eos: int, vocab: int, tokens: list[int], batch: int) -> dict:
    """shoal's own path per step: every row's mask (token_mask), then apply_token_mask on float32 logits."""
    from tokenizers import Tokenizer as HFTokenizer

    from shoal.engine.grammar import GrammarCompiler, token_mask
    from shoal.layers.sampler import apply_token_mask
    from shoal.sampling_params import StructuredOutputsParams
    from shoal.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_tokenizer(HFTokenizer.from_str(tokenizer_json), {"eos_token": "<|eos|>"}, vocab)
    compiler = GrammarCompiler(tokenizer, [eos], vocab)
    spec = StructuredOutputsParams(json=SCHEMA)
    matchers = [compiler.matcher(spec) for _ in range(batch)]
    logits = torch.randn(batch, vocab)
    total, apply = [], []
    for token in tokens:
        c = time.process_time()
        mask = token_mask(matchers, vocab)
        a = time.process_time()
        apply_token_mask(logits, mask)
        done = time.process_time()
        total.append(done - c)
        apply.append(done - a)
        for m in matchers:
            assert m.accept(token)
    return {"step_ms": median_ms(total), "apply_ms": median_ms(apply)}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", action="append", default=None,
                        help="tokenizer.json files to measure (default: the demo model's and a 128k BPE)")
    parser.add_argument("--batch", type=int, action="append", default=None, help="batch sizes (default: 1 and 32)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    paths = [Path(p) for p in args.tokenizer] if args.tokenizer else [ROOT / "shoal/demo_model/tokenizer.json",
                                                                      synthetic_128k()]
    batches = args.batch or [1, 32]
    print(f"CPU: {cpu_name()}; torch {torch.__version__}, 1 thread; schema reply of "
          f"{len(json.dumps(REPLY, separators=(',', ':')))} characters")
    from tokenizers import Tokenizer

    for path in paths:
        text = path.read_text(encoding="utf-8")
        tok = Tokenizer.from_str(text)
        vocab = tok.get_vocab_size(with_added_tokens=True)
        eos = tok.token_to_id("<|eos|>")
        if eos is None:
            eos = tok.token_to_id("</s>") or tok.token_to_id("<|end_of_text|>") or 0
        tokens = tok.encode(json.dumps(REPLY, separators=(",", ":")), add_special_tokens=False).ids
        print(f"\n{path.name}: vocabulary {vocab}, reply {len(tokens)} tokens")
        print(f"{'library':<12} {'batch':>5} {'compile ms':>11} {'mask ms/step':>13} {'(wall)':>8} "
              f"{'advance ms':>11}")
        for batch in batches:
            for name, result in (("llguidance", bench_llguidance(text, eos, vocab, tokens, batch)),
                                 ("xgrammar", bench_xgrammar(text, vocab, tokens, batch))):
                if result is None:
                    print(f"{name:<12} {batch:>5}  (not installed)")
                    continue
                print(f"{name:<12} {batch:>5} {result['compile_ms']:>11.2f} {result['mask_ms']:>13.3f} "
                      f"{result['mask_wall_ms']:>8.3f} {result['advance_ms']:>11.3f}")
            shoal = bench_shoal(text, eos, vocab, tokens, batch)
            print(f"{'shoal path':<12} {batch:>5} {'':>11} {shoal['step_ms']:>13.3f} {'':>8} "
                  f"{'':>11}  (of which applying the mask to the logits: {shoal['apply_ms']:.3f} ms)")


if __name__ == "__main__":
    main()
