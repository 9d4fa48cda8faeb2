"""A third-party backend registered through the `shoal.backends` entry point runs a model end to end,
through its own attention and its own operations."""

from __future__ import annotations

import pytest
import torch

from shoal import LLM, SamplingParams
from shoal.loader import build_model


@pytest.mark.parametrize("name", ["deepseek-v3", "llama"])
def test_fake_entry_point_backend_runs_a_model(fake_backend, checkpoint, name):
    # Both model families: neither may swap a backend's own attention for shoal's fused CPU decode.
    fake_backend.attention_calls = 0
    path, _ = checkpoint(name)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    on_fake = LLM(str(path), device="fakechip", dtype="float32", progress=False)
    assert on_fake.backend is fake_backend
    out = on_fake.generate([3, 4, 5, 6], params)[0]
    # the plugin's attention kernel ran: once per layer for the prefill and for each decode step
    layers = on_fake.model_config.num_hidden_layers
    assert fake_backend.attention_calls == layers * len(out.token_ids)
    on_cpu = LLM(str(path), device="cpu", dtype="float32", progress=False)
    assert on_cpu.generate([3, 4, 5, 6], params)[0].token_ids == out.token_ids


@pytest.mark.parametrize("name", ["deepseek-v3", "llama", "qwen3"])
def test_a_backends_own_ops_run_the_model_and_match_transformers(fake_backend, checkpoint, name):
    """The plugin's RMSNorm, SiLU-and-multiply and attention take the place of shoal's in every layer
    (bound once when the model is built) and the logits still match transformers."""
    path, reference = checkpoint(name)
    ids = torch.randint(2, 300, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits[0]
    model, config, _ = build_model(path, fake_backend, torch.device("cpu"), torch.float32, progress=False)
    assert model.ops.name == "fakechip" and all(m.ops is model.ops for m in model.modules() if hasattr(m, "ops"))
    fake_backend.op_calls.clear()
    fake_backend.attention_calls = 0
    cache = model.make_cache(1, ids.shape[1], torch.float32, "cpu")
    with torch.no_grad():
        logits = model.compute_logits(model(ids, torch.arange(ids.shape[1])[None], cache))[0]
    assert (logits - expected).abs().max().item() < 1e-4
    layers = config.num_hidden_layers
    assert fake_backend.attention_calls == layers
    assert fake_backend.op_calls["rms_norm"] >= 2 * layers + 1 and fake_backend.op_calls["silu_mul"] >= layers
    # and greedy decoding picks its tokens with the plugin's argmax
    llm = LLM(str(path), device="fakechip", dtype="float32", progress=False)
    fake_backend.op_calls.clear()
    out = llm.generate([3, 4, 5, 6], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 4 and fake_backend.op_calls["argmax"] == 4
