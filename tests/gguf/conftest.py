"""GGUF files converted from the tiny checkpoints the way llama.cpp would, once per session."""

from __future__ import annotations

import pytest
import torch

from hf_to_gguf import convert


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


def shoal_logits(model, ids: torch.Tensor) -> torch.Tensor:
    cache = model.make_cache(1, ids.shape[1], torch.float32, "cpu")
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(ids.shape[1])[None], cache))[0]
