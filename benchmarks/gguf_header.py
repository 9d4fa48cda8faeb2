"""Times opening a GGUF file's header (shoal.gguf.GGUFFile) on a file shaped like a real one: Llama 3's
vocabulary size (128,256 tokens, 280,147 merges) in the metadata, a tiny model's tensors.

    python benchmarks/gguf_header.py [--repeat 3] [--file FILE.gguf]

--file times a real file instead, e.g. llama.cpp's vocab-only models/ggml-vocab-llama-bpe.gguf (Llama 3's
tokenizer: 128,256 tokens, 280,147 merges) from its source tree.

Run it from two checkouts (PYTHONPATH=<checkout>) to compare them; before the single-parse reader, an
LLM opened the file twice (model, then tokenizer), each time walking the header and then GGUFReader.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

TOKENS, MERGES = 128_256, 280_147


def write_file(path: Path) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(8192)
    writer.add_embedding_length(256)
    writer.add_block_count(1)
    writer.add_feed_forward_length(512)
    writer.add_head_count(4)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"token{i}" for i in range(TOKENS)])
    writer.add_token_types([1] * TOKENS)
    writer.add_token_merges([f"t{i} o{i}" for i in range(MERGES)])
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((TOKENS, 256), dtype=np.float32).astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--file", type=Path, help="a GGUF file to time instead of the generated one")
    args = parser.parse_args()
    import shoal
    from shoal.gguf import GGUFFile

    with tempfile.TemporaryDirectory() as tmp:
        path = args.file or Path(tmp) / "vocab.gguf"
        if args.file is None:
            write_file(path)
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            file = GGUFFile(path)
            tokens = file.metadata("tokenizer.ggml.tokens")
            merges = file.metadata("tokenizer.ggml.merges")
            times.append(time.perf_counter() - start)
    print(f"shoal from {Path(shoal.__file__).parent.parent}, on {cpu_name()}, load average {os.getloadavg()[0]:.1f}")
    print(f"{path.name}: GGUFFile open + tokens + merges ({len(tokens):,} / {len(merges or []):,}): "
          f"best {min(times):.2f} s of {args.repeat}")


if __name__ == "__main__":
    main()
