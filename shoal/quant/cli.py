"""The command-line side of quantization: `--quant` / `--group-size` on generate, chat and serve, and the
`shoal quantize` subcommand."""

from __future__ import annotations

import argparse


def add_quant_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quant", default=None, choices=["int8", "int4", "fp8"],
                        help="store the weights quantized: int8 per channel, int4 in groups, fp8 in 128x128 blocks")
    parser.add_argument("--group-size", type=int, default=None, choices=[32, 64, 128],
                        help="inputs per int4 scale (default: the checkpoint's, else 64)")


def add_quantize_parser(subparsers) -> argparse.ArgumentParser:
    quantize = subparsers.add_parser(
        "quantize", help="write a quantized copy of a checkpoint (compressed-tensors for int8/int4, DeepSeek fp8)"
    )
    quantize.add_argument("--model", required=True, help="checkpoint folder to quantize")
    quantize.add_argument("--out", required=True, help="new folder for the quantized checkpoint")
    quantize.add_argument("--quant", required=True, choices=["int8", "int4", "fp8"], help="weight format")
    quantize.add_argument("--group-size", type=int, default=None, choices=[32, 64, 128],
                          help="inputs per int4 scale (default 64)")
    quantize.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                          help="dtype of the scales: the dtype the checkpoint will be run in (default: as loading picks)")
    return quantize


def cmd_quantize(args: argparse.Namespace) -> int:
    from shoal.models.hf_config import parse_dtype
    from shoal.quant.offline import quantize_checkpoint

    out = quantize_checkpoint(args.model, args.out, args.quant, args.group_size, parse_dtype(args.dtype))
    print(f"wrote {args.quant} checkpoint to {out}")
    return 0
