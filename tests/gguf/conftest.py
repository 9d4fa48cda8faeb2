"""GGUF files converted from the tiny checkpoints the way llama.cpp would, once per session."""

from __future__ import annotations

import pytest
import torch

from checkpoints import build_checkpoint
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


# rows of 256 and 512 values, so that llama.cpp's K-quants (256-value super-blocks) apply to every matrix
LLAMA_256 = dict(hidden_size=256, intermediate_size=512, initializer_range=0.05)
HEADS, KV_HEADS = 4, 2  # tests/checkpoints.py's llama
IDS_32 = torch.arange(2, 34)[None]


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


def transformers_from_gguf(path):
    """transformers' own GGUF reader (gguf.quants underneath) on the same file: an outside reference model."""
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict(tensors, strict=True)
    return model
