"""Quantize on load, offline `shoal quantize` -> load, and the layers each format swaps in."""

from __future__ import annotations

import json

import pytest
import torch

from shoal import LLM, SamplingParams
from shoal.cli import main
from shoal.quant.layers import QuantizedEmbedding, QuantizedLinear, QuantizedStackedExperts, TiedQuantizedHead
from shoal.quant.offline import quantize_checkpoint


@pytest.mark.parametrize(
    "arch, quant, group, dtype",
    [
        ("llama", "int4", 32, torch.bfloat16),
        ("llama", "int8", None, torch.bfloat16),
        ("deepseek-v3", "int8", None, torch.float32),
        ("deepseek-v3", "int4", 32, torch.float32),
        ("deepseek-v3", "fp8", None, torch.bfloat16),
        ("mixtral", "int4", 32, torch.float32),  # written under Mixtral's own names (block_sparse_moe, w1 / w2 / w3)
        ("qwen2-moe", "int8", None, torch.float32),  # the shared expert's one-row gate stays dense
    ],
)
def test_offline_checkpoint_gives_the_same_logits_as_quantizing_on_load(checkpoint, logits, tmp_path, arch, quant, group, dtype):
    src, _ = checkpoint(arch)
    out = quantize_checkpoint(src, tmp_path / "q", quant, group, dtype, progress=False)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == ("fp8" if quant == "fp8" else "compressed-tensors")
    on_load = logits(src, dtype, quant=quant, quant_group_size=group)
    offline = logits(out, dtype)
    assert torch.equal(on_load, offline)


def test_quantized_llama_stays_close_to_full_precision(checkpoint, logits):
    src, _ = checkpoint("llama")
    dense = logits(src)
    for quant, bound in (("int8", 0.05), ("int4", 0.5), ("fp8", 0.3)):
        err = (logits(src, quant=quant, quant_group_size=32) - dense).abs().max()
        assert err < bound * dense.abs().max(), quant


def test_layers_swapped_per_format(checkpoint):
    from shoal.backends import get_backend
    from shoal.loader import build_model

    src, _ = checkpoint("deepseek-v3")
    model, _, _ = build_model(src, get_backend("cpu"), torch.device("cpu"), torch.bfloat16, progress=False,
                              quant="int4", quant_group_size=32)
    attn = model.model.layers[1].self_attn
    assert isinstance(attn.q_a_proj, QuantizedLinear) and attn.q_a_proj.fmt == "int4"
    assert not isinstance(attn.kv_b_proj, QuantizedLinear)  # MLA's absorbed decode reads it directly
    assert isinstance(model.model.layers[1].mlp.experts, QuantizedStackedExperts)
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    assert isinstance(model.lm_head, QuantizedLinear) and model.lm_head.fmt == "int8"
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_tied_embeddings_share_one_int8_table(checkpoint, logits):
    src, _ = checkpoint("qwen2")
    dense = logits(src)
    quantized = logits(src, quant="int8")
    assert (quantized - dense).abs().max() < 0.05 * dense.abs().max()
    llm = LLM(str(src), dtype="float32", progress=False, quant="int8")
    assert isinstance(llm.model.lm_head, TiedQuantizedHead)


def test_llm_generates_with_each_format_and_cli_round_trip(checkpoint, tmp_path, capsys):
    src, _ = checkpoint("deepseek-v2-lite")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    out = LLM(str(src), dtype="bfloat16", progress=False, quant="int4", quant_group_size=32).generate([5, 6, 7], params)
    assert len(out[0].token_ids) == 6
    assert main(["quantize", "--model", str(src), "--out", str(tmp_path / "q8"), "--quant", "int8"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "q8"), "--prompt-ids", "5,6,7", "--max-tokens", "4",
                 "--temperature", "0", "--ignore-eos", "--json"]) == 0
    offline = json.loads(capsys.readouterr().out)["token_ids"]
    assert main(["generate", "--model", str(src), "--quant", "int8", "--prompt-ids", "5,6,7", "--max-tokens", "4",
                 "--temperature", "0", "--ignore-eos", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == offline
