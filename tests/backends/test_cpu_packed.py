"""bf16 weights packed once for batched CPU decode (shoal/backends/cpu_packed.py): the same bits as
F.linear on the plain weight, in the engine too, and only within the memory rule."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from checkpoints import build_checkpoint
from shoal import LLM, SamplingParams
from shoal.backends import cpu_packed
from shoal.layers.linear import Linear

pytestmark = pytest.mark.skipif(not cpu_packed.supported(), reason="no oneDNN bf16 on this CPU / torch build")


@pytest.mark.parametrize("rows", [9, 13, 16, 31, 32])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_matmul_equals_f_linear(rows, bias):
    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(96, 160, generator=g) * 0.05).to(torch.bfloat16)
    b = torch.randn(96, generator=g).to(torch.bfloat16) if bias else None
    x = torch.randn(rows, 160, generator=g).to(torch.bfloat16)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, cpu_packed.MAX_ROWS)
    assert torch.equal(cpu_packed.matmul(x, packed, b), F.linear(x, w, b))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-packed")
    build_checkpoint("llama", path)
    return path


def _generate(path, monkeypatch, switch: str):
    monkeypatch.setenv(cpu_packed.ENV_SWITCH, switch)
    llm = LLM(str(path), dtype="bfloat16", progress=False, max_model_len=64, max_num_seqs=16, kv_cache_memory=8 << 20)
    prompts = [[(5 * i + 3 * j) % 250 + 3 for j in range(3 + i)] for i in range(14)]  # decode steps of 14 rows
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2))
    packed = [m for m in llm.engine.model.modules() if getattr(m, "packed_weight", None) is not None]
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs], packed


def test_engine_gives_the_same_tokens_packed_or_not(llama, monkeypatch):
    with_packed, packed = _generate(llama, monkeypatch, "1")
    assert packed  # every linear layer and the head
    without, none = _generate(llama, monkeypatch, "0")
    assert not none and with_packed == without


def test_packs_only_within_the_memory_share(monkeypatch):
    model = torch.nn.Sequential(Linear(64, 32), Linear(32, 64)).to(torch.bfloat16)
    size = sum(p.numel() * 2 for p in model.parameters())
    monkeypatch.delenv(cpu_packed.ENV_SWITCH, raising=False)
    monkeypatch.setattr(cpu_packed, "_available_bytes", lambda: 2 * size)  # a quarter is less than the weights
    assert cpu_packed.pack_model(model) == 0 and model[0].packed_weight is None
    monkeypatch.setattr(cpu_packed, "_available_bytes", lambda: 8 * size)
    assert cpu_packed.pack_model(model) == size and model[1].packed_weight is not None
