"""GGUF files (llama.cpp's format): checked reading, metadata -> ModelConfig, tensor names -> Hugging Face
names, quantized blocks (int4 group-32 codes or dequantized), and the tokenizer from the metadata. `--model file.gguf` comes through here."""

from __future__ import annotations

from shoal.gguf.dequant import int4_blocks, q4_0_blocks, q4_1_blocks, q4_k_blocks, q8_0_blocks
from shoal.gguf.loader import build_gguf_model, is_gguf
from shoal.gguf.reader import SUPPORTED_TYPES, GGUFFile

__all__ = [
    "GGUFFile", "SUPPORTED_TYPES", "build_gguf_model", "int4_blocks", "is_gguf", "q4_0_blocks", "q4_1_blocks", "q4_k_blocks",
    "q8_0_blocks",
]
