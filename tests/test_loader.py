"""Loading: sharded safetensors with an index, generation_config.json's EOS, and dtype choice."""

from __future__ import annotations

import json

import torch

from checkpoints import build_checkpoint
from shoal import LLM, SamplingParams
from shoal.backends import get_backend
from shoal.loader import build_model, safetensors_files


def test_sharded_checkpoint_with_index(tmp_path, checkpoint):
    import transformers

    _, reference = checkpoint("deepseek-v2-lite")
    sharded = tmp_path / "sharded"
    reference.save_pretrained(sharded, safe_serialization=True, max_shard_size="100KB")
    (sharded / "tokenizer.json").write_bytes((checkpoint("deepseek-v2-lite")[0] / "tokenizer.json").read_bytes())
    files = safetensors_files(sharded)
    assert len(files) > 1 and (sharded / "model.safetensors.index.json").is_file()
    model, _, _ = build_model(sharded, get_backend("cpu"), torch.device("cpu"), torch.float32, progress=False)
    ids = torch.arange(2, 18)[None]
    cache = model.make_cache(1, 16, torch.float32, "cpu")
    with torch.no_grad():
        ours = model.compute_logits(model(ids, torch.arange(16)[None], cache))[0]
        theirs = reference(ids).logits[0]
    assert (ours - theirs).abs().max() < 1e-4
    assert isinstance(reference, transformers.PreTrainedModel)


def test_eos_from_generation_config_stops_generation(tmp_path):
    path = tmp_path / "model"
    build_checkpoint("llama", path, seed=3)
    prompt = [5, 6, 7]
    free = LLM(str(path), dtype="float32", progress=False).generate(
        prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    )[0]
    eos = free.token_ids[4]
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, 10_000]}))
    llm = LLM(str(path), dtype="float32", progress=False)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=10))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == free.token_ids[: free.token_ids.index(eos) + 1]
    # ignore_eos generates past it
    assert llm.generate(prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].token_ids == free.token_ids


def test_auto_dtype_keeps_a_float32_checkpoint_in_float32(checkpoint):
    path, _ = checkpoint("llama")
    assert LLM(str(path), progress=False).dtype == torch.float32
