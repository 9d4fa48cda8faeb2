"""GGUF files converted from the tiny checkpoints the way llama.cpp would, once per session."""

from __future__ import annotations

import pytest

from checkpoints import build_checkpoint
from hf_to_gguf import convert
from gguf_reference import LLAMA_256


@pytest.fixture(scope="session")
def gguf_model(checkpoint, tmp_path_factory):
    """gguf_model(name, ftype, split_kv_b=True) -> (gguf path, hf folder, transformers model, weights the file holds)."""
    built: dict = {}

    def get(name: str, ftype: str = "F32", split_kv_b: bool = True):
        key = (name, ftype, split_kv_b)
        if key not in built:
            folder, reference = checkpoint(name)
            out = tmp_path_factory.mktemp("gguf") / f"{name}-{ftype}.gguf"
            held = convert(folder, out, ftype, split_kv_b)
            built[key] = (out, folder, reference, held)
        return built[key]

    return get


@pytest.fixture(scope="session")
def llama_256(tmp_path_factory):
    """(folder, transformers model) of a two-layer random Llama with 256-wide rows."""
    folder = tmp_path_factory.mktemp("llama-256")
    return folder, build_checkpoint("llama", folder, **LLAMA_256)


@pytest.fixture(scope="session")
def written(llama_256, tmp_path_factory):
    """written(ftype) -> the llama-256 checkpoint as a GGUF file of `ftype`, written by gguf's writer."""
    files: dict[str, object] = {}

    def get(ftype: str):
        if ftype not in files:
            files[ftype] = tmp_path_factory.mktemp("written") / f"llama-256-{ftype}.gguf"
            convert(llama_256[0], files[ftype], ftype, return_weights=False)
        return files[ftype]

    return get
