"""GGUF files (llama.cpp's format): checked reading, metadata -> ModelConfig, tensor names -> Hugging Face
names, Q8_0 / Q4_0 blocks, and the tokenizer from the metadata. `--model file.gguf` comes through here."""

from __future__ import annotations

from shoal.gguf.dequant import q4_0_blocks, q8_0_blocks
from shoal.gguf.loader import build_gguf_model, is_gguf
from shoal.gguf.reader import SUPPORTED_TYPES, GGUFFile

__all__ = ["GGUFFile", "SUPPORTED_TYPES", "build_gguf_model", "is_gguf", "q4_0_blocks", "q8_0_blocks"]
