"""The command-line options that choose a model and how it runs — shared by `generate`, `chat` and
`serve` so that each flag is defined, and turned into `LLM(...)` arguments, in one place."""

from __future__ import annotations

import argparse

from shoal.backends.ops import ISA_LEVELS, KERNEL_CHOICES


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model, --device, --dtype, --max-model-len, --kv-cache-dtype, the weight quantization and the
    parallel-split flags."""
    from shoal.parallel.config import add_parallel_arguments
    from shoal.quant.cli import add_quant_options

    parser.add_argument("--model", default=None,
                        help="checkpoint folder, GGUF file or hub id; default: the bundled demo model")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, npu, xpu, mps, ...; default: best present")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="compute dtype")
    parser.add_argument("--max-model-len", type=positive_int, default=None, help="cap the context length")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8", "fp8"],
                        help="store the KV cache in 8 bits with per-token scales (default auto: the compute dtype)")
    parser.add_argument("--cpu-kernels", default=None, choices=list(KERNEL_CHOICES),
                        help="on the CPU: shoal's C kernels where they are faster here (auto), wherever they are "
                             "built (shoal), or PyTorch's only (torch); default auto, or torch when "
                             "SHOAL_CPU_KERNELS=0")
    parser.add_argument("--cpu-isa", default=None, choices=list(ISA_LEVELS),
                        help="on the CPU: cap the instruction set shoal's C kernels are built for (native: every "
                             "extension this CPU has; avx512 without AMX; avx2; portable C); default "
                             "SHOAL_CPU_ISA, else native")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="run every decode step layer by layer, never as a recorded and replayed step")
    parser.add_argument("--speculative", default=None, choices=["ngram", "mtp"],
                        help="speculative decoding: draft tokens by prompt lookup (ngram, any model) or with the "
                             "checkpoint's DeepSeek multi-token-prediction module (mtp), verified in one forward")
    parser.add_argument("--num-speculative-tokens", type=positive_int, default=None,
                        help="draft tokens per step under --speculative (default 4 for ngram, 2 for mtp)")
    parser.add_argument("--speculative-max-batch", type=int, default=8,
                        help="draft only while at most this many sequences run (default 8; 0: at any batch size)")
    add_quant_options(parser)
    add_parallel_arguments(parser)


def llm_options(args: argparse.Namespace) -> dict:
    """The LLM(...) keyword arguments (besides the model) that add_model_options' flags set."""
    from shoal.parallel.config import parallel_kwargs

    return dict(device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
                kv_cache_dtype=args.kv_cache_dtype, quant=args.quant, quant_group_size=args.group_size,
                cpu_kernels=args.cpu_kernels, cpu_isa=args.cpu_isa, enforce_eager=args.enforce_eager,
                speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens,
                speculative_max_batch=args.speculative_max_batch or None,
                **parallel_kwargs(args))
