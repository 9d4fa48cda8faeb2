"""float32 weights packed for MKL's sgemm (shoal/backends/cpu/packed_f32.py) against F.linear."""

from __future__ import annotations

import pytest
import torch
from checkpoints import build_checkpoint
from torch.nn import functional as F

from shoal import LLM
from shoal.backends.cpu import packed_f32 as cpu_packed_f32
from shoal.layers.embedding import LMHead, VocabEmbedding
from shoal.layers.linear import Linear, MergedLinear
from shoal.sampling_params import SamplingParams


# Layers built here, outside a model, call the CPU backend's ops (tests/backends/conftest.py).
pytestmark = [
    pytest.mark.skipif(not cpu_packed_f32.available(), reason="this torch has no MKL packed sgemm"),
    pytest.mark.usefixtures("cpu_ops_bound"),
]


def _close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    # Only the summation order differs from F.linear's.
    assert ours.shape == reference.shape and ours.dtype == reference.dtype
    assert (ours - reference).abs().max().item() <= 1e-5 * reference.abs().max().item()


@pytest.mark.parametrize("rows", [1, 2, 3, 17, 32, 33, 100, 513])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_weight_multiplies_any_row_count_like_f_linear(rows, bias):
    g = torch.Generator().manual_seed(rows)
    layer = Linear(96, 200, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(200, 96, generator=g))
        if bias:
            layer.bias.copy_(torch.randn(200, generator=g))
    x = torch.randn(1, rows, 96, generator=g)
    reference = F.linear(x, layer.weight, layer.bias)
    assert cpu_packed_f32.pack_model(layer, free_bytes=1 << 30) == 200 * 96 * 4
    assert layer.prepared is not None and layer.prepared.takes(x, layer.weight)
    _close(layer(x), reference)


def test_other_dtypes_and_other_weights_keep_f_linear():
    layer = Linear(64, 32)
    torch.nn.init.normal_(layer.weight)
    cpu_packed_f32.pack_model(layer, free_bytes=1 << 30)
    assert not layer.prepared.takes(torch.randn(4, 64, dtype=torch.bfloat16), layer.weight)
    assert not layer.prepared.takes(torch.randn(4, 64), torch.randn(32, 64))
    assert cpu_packed_f32.pack(layer.weight.to(torch.bfloat16)) is None


def test_a_weight_changed_after_packing_is_read_fresh():
    """The packed copy is tied to the weight's version: an in-place change afterwards goes back to F.linear."""
    layer = MergedLinear(64, [16, 16], ("a", "b"))
    torch.nn.init.normal_(layer.weight)
    cpu_packed_f32.pack_model(layer, free_bytes=1 << 30)
    x = torch.randn(5, 64)
    with torch.no_grad():
        layer.weight.mul_(2)
    assert not layer.prepared.takes(x, layer.weight)
    _close(layer(x), F.linear(x, layer.weight))


def test_packing_stays_within_its_share_of_free_memory():
    model = torch.nn.Sequential(Linear(64, 64), Linear(64, 64), Linear(64, 64))
    for layer in model:
        torch.nn.init.normal_(layer.weight)
    one = 64 * 64 * 4
    assert cpu_packed_f32.pack_model(model, free_bytes=int(2.5 * one / cpu_packed_f32.MEMORY_SHARE)) == 2 * one
    assert [m.prepared is not None for m in model] == [True, True, False]


def test_tied_output_head_packs_the_embedding():
    embedding = VocabEmbedding(300, 48)
    torch.nn.init.normal_(embedding.weight)
    head = LMHead(300, 48, tied_to=embedding)
    cpu_packed_f32.pack_model(head, free_bytes=1 << 30)
    hidden = torch.randn(7, 48)
    assert head.prepared is not None
    _close(head(hidden), F.linear(hidden, embedding.weight))


def test_a_float32_model_loads_packed_and_answers_as_unpacked(tmp_path, monkeypatch):
    """The engine's float32 path: packed at load, and the same greedy tokens as with packing switched off."""
    path = tmp_path / "llama"
    build_checkpoint("llama-tied-llama3-rope", path)
    prompts = [[5, 9, 14, 3], [7, 7, 21, 4, 2, 8], [11, 6]]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm = LLM(str(path), device="cpu", dtype="float32", progress=False)
    assert llm.model.lm_head.prepared is not None
    packed = [o.token_ids for o in llm.generate(prompts, greedy)]
    del llm
    monkeypatch.setenv(cpu_packed_f32.ENV_SWITCH, "0")
    cpu_packed_f32.available.cache_clear()
    try:
        llm = LLM(str(path), device="cpu", dtype="float32", progress=False)
        assert llm.model.lm_head.prepared is None
        assert [o.token_ids for o in llm.generate(prompts, greedy)] == packed
    finally:
        monkeypatch.delenv(cpu_packed_f32.ENV_SWITCH)
        cpu_packed_f32.available.cache_clear()
