"""DeepSeek-style fp8 block checkpoints (DeepSeek-V3's and Qwen3's published FP8 layout) on a device without
fp8: to the compute dtype, or straight to int8."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from shoal.backends import get_backend
from shoal.errors import ConfigError, WeightError
from shoal.quant.formats import Fp8BlockWeight

FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


ROUTERS = ("mlp.gate.weight", "block_sparse_moe.gate.weight", "shared_expert_gate.weight")


def _is_block_quantized(name: str, tensor: torch.Tensor) -> bool:
    # DeepSeek-V3 and Qwen3-FP8 keep embeddings, the head, norms and the router in bf16 / fp32.
    return tensor.dim() == 2 and "embed_tokens" not in name and "lm_head" not in name and not name.endswith(ROUTERS)


def write_fp8_checkpoint(src, dst):
    """(fp8 checkpoint folder, the same weights dequantized as a plain float32 checkpoint folder)."""
    from safetensors.torch import load_file, save_file

    fp8, plain = dst / "fp8", dst / "plain"
    for folder in (fp8, plain):
        shutil.copytree(src, folder)
    tensors = load_file(str(src / "model.safetensors"))
    fp8_tensors, plain_tensors = {}, {}
    for name, t in tensors.items():
        if _is_block_quantized(name, t):
            q = Fp8BlockWeight.quantize(t)
            fp8_tensors[name], fp8_tensors[name + "_scale_inv"] = q.weight, q.scale_inv
            plain_tensors[name] = q.dequantize(torch.float32)
        else:
            fp8_tensors[name] = plain_tensors[name] = t
    save_file(fp8_tensors, str(fp8 / "model.safetensors"))
    save_file(plain_tensors, str(plain / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = FP8_CONFIG
    (fp8 / "config.json").write_text(json.dumps(config))
    return fp8, plain


@pytest.fixture(scope="module")
def fp8_pair(checkpoint, tmp_path_factory):
    src, _ = checkpoint("deepseek-v3")
    return write_fp8_checkpoint(src, tmp_path_factory.mktemp("fp8"))


@pytest.fixture(scope="module", params=["deepseek-v3", "qwen3-moe", "qwen2-moe", "mixtral"])
def any_fp8_pair(request, checkpoint, tmp_path_factory):
    if request.param == "deepseek-v3":
        return request.getfixturevalue("fp8_pair")
    return write_fp8_checkpoint(checkpoint(request.param)[0], tmp_path_factory.mktemp("fp8"))


def test_fp8_checkpoint_converts_to_the_compute_dtype_and_matches_transformers(any_fp8_pair, logits):
    import transformers

    fp8, plain = any_fp8_pair
    assert get_backend("cpu").supports_fp8_matmul() is False
    ours = logits(fp8)
    reference = transformers.AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reference(torch.arange(2, 18)[None]).logits[0]
    assert (ours - theirs).abs().max() < 1e-4


def test_fp8_checkpoint_straight_to_int8_matches_int8_of_the_dequantized_weights(any_fp8_pair, logits):
    fp8, plain = any_fp8_pair
    assert torch.equal(logits(fp8, quant="int8"), logits(plain, quant="int8"))
    assert torch.equal(logits(fp8, quant="int4", quant_group_size=32), logits(plain, quant="int4", quant_group_size=32))


def test_fp8_is_kept_where_the_backend_multiplies_in_fp8(fp8_pair, logits):
    from shoal.quant.layers import QuantizedLinear
    from shoal.loader import build_model

    class Fp8Cpu(type(get_backend("cpu"))):
        def supports_fp8_matmul(self):
            return True

    fp8, _ = fp8_pair
    model, _, _ = build_model(fp8, Fp8Cpu(), torch.device("cpu"), torch.float32, progress=False)
    assert model.model.layers[1].self_attn.q_a_proj.fmt == "fp8"
    assert isinstance(model.model.layers[1].self_attn.q_a_proj, QuantizedLinear)
    assert torch.allclose(logits(fp8, backend=Fp8Cpu()), logits(fp8), atol=1e-4)


def test_fp8_checkpoint_errors(fp8_pair, tmp_path, logits):
    fp8, _ = fp8_pair
    bad = tmp_path / "bad"
    shutil.copytree(fp8, bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [64, 64]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="weight_block_size"):
        logits(bad)
    from safetensors.torch import load_file, save_file

    config["quantization_config"]["weight_block_size"] = [128, 128]
    (bad / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(WeightError, match="o_proj"):
        logits(bad)
