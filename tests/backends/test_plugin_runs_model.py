"""A third-party backend registered through the `shoal.backends` entry point runs a model end to end."""

from __future__ import annotations

import pytest

from shoal import LLM, SamplingParams


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
