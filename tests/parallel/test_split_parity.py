"""Every split reproduces one process: same greedy tokens, logits within 1e-4 (float32, gloo on CPU);
a quantized split reproduces one process quantized the same way, and a GGUF file split reproduces the
same file in one process."""

from __future__ import annotations

import pytest

TOLERANCE = 1e-4


def max_logit_diff(a: dict, b: dict) -> float:
    assert a["logits"].keys() == b["logits"].keys()
    return max(max(abs(x - y) for x, y in zip(a["logits"][k], b["logits"][k])) for k in a["logits"])


CASES = [
    ("llama", {"tp": 2}),
    ("llama", {"pp": 2}),
    ("deepseek-v3", {"tp": 2}),
    ("deepseek-v3", {"ep": 2}),
    ("deepseek-v3", {"pp": 2}),
    ("deepseek-v3", {"tp": 2, "pp": 2}),  # four processes: two stages of two tensor-parallel ranks
    # Quantized weights: compared to one process with the same --quant.
    ("llama", {"tp": 2, "quant": "int8"}),
    ("qwen2", {"tp": 2, "quant": "int8"}),  # tied int8 embedding / head, q/k/v biases
    ("deepseek-v3", {"tp": 2, "quant": "int8"}),
    ("deepseek-v3", {"ep": 2, "quant": "int8"}),
    ("deepseek-v3", {"pp": 2, "quant": "int8"}),
    ("llama", {"tp": 2, "quant": "int4", "quant_group_size": 32}),  # o_proj's 32 inputs per rank: one group
    # The Llama family's MoE kin: routed experts cut (tp), whole experts per rank (ep), layers per stage (pp).
    *[(name, split) for name in ("qwen3-moe", "qwen2-moe", "mixtral") for split in ({"tp": 2}, {"ep": 2}, {"pp": 2})],
    ("qwen2-moe", {"ep": 2, "quant": "int8"}),  # the gated shared expert replicated, int8 experts partitioned
    ("mixtral", {"tp": 2, "quant": "int4", "quant_group_size": 32}),  # experts' 128 intermediate: 2 groups a rank
    ("qwen3-moe", {"pp": 2, "quant": "int4", "quant_group_size": 32}),  # the dense layer 0 and the MoE layer 1 apart
]
QUANT_KEYS = ("quant", "quant_group_size")


@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_split_matches_one_process(checkpoint, split_run, name, options):
    path, _ = checkpoint(name)
    reference = split_run(path, {k: v for k, v in options.items() if k in QUANT_KEYS})
    split = split_run(path, options)
    assert split["tokens"] == reference["tokens"]
    diff = max_logit_diff(split, reference)
    print(f"{name} {options}: max |logit diff| = {diff:.2e}")
    assert diff < TOLERANCE
    if "quant" in options:  # the quantization took effect: the quantized model is not the float one
        assert max_logit_diff(reference, split_run(path, {})) > TOLERANCE
    assert split["expert_load"] == reference["expert_load"]  # every routed token counted once


@pytest.mark.parametrize("options,even", [
    ({"pp": 2, "pp_layers": "1,2"}, {"pp": 2}),  # layers 0 | 1-2 instead of 0-1 | 2
    ({"ep": 2, "ep_weights": "3,1"}, {"ep": 2}),  # experts 0-5 | 6-7 instead of 0-3 | 4-7
])
def test_uneven_split_matches_even_split(checkpoint, split_run, options, even):
    path, _ = checkpoint("deepseek-v3")
    uneven, balanced = split_run(path, options), split_run(path, even)
    assert uneven["tokens"] == balanced["tokens"]
    assert max_logit_diff(uneven, balanced) < TOLERANCE


def _fp8_checkpoint(src, dst):
    """DeepSeek-V3's own layout: 2-D weights in fp8 128 x 128 blocks (not the embeddings, head, router)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from shoal.quant.formats import Fp8BlockWeight

    shutil.copytree(src, dst)
    tensors = {}
    for name, t in load_file(str(src / "model.safetensors")).items():
        if t.dim() == 2 and not any(k in name for k in ("embed_tokens", "lm_head", "mlp.gate.weight")):
            q = Fp8BlockWeight.quantize(t)
            tensors[name], tensors[name + "_scale_inv"] = q.weight, q.scale_inv
        else:
            tensors[name] = t
    save_file(tensors, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("stored,options", [
    ("int8", {"tp": 2}),  # written by `shoal quantize` (compressed-tensors): loads quantized without --quant
    ("fp8", {"tp": 2, "quant": "int8"}),  # DeepSeek-V3 fp8 blocks, converted to int8 whole before the split
])
def test_quantized_checkpoint_splits_like_one_process(checkpoint, split_run, tmp_path_factory, stored, options):
    import torch

    from shoal.quant.offline import quantize_checkpoint

    out = tmp_path_factory.mktemp(stored) / "q"
    if stored == "fp8":
        path = _fp8_checkpoint(checkpoint("deepseek-v3")[0], out)
    else:
        path = quantize_checkpoint(checkpoint("llama")[0], out, stored, None, torch.float32, progress=False)
    reference = split_run(path, {k: v for k, v in options.items() if k in QUANT_KEYS})
    split = split_run(path, options)
    assert split["tokens"] == reference["tokens"]
    diff = max_logit_diff(split, reference)
    print(f"{stored} checkpoint {options}: max |logit diff| = {diff:.2e}")
    assert diff < TOLERANCE


GGUF_CASES = [
    ("mixtral", "Q4_0", {"tp": 2}),  # llama with experts; the file's int4 codes cut per rank on group boundaries
    ("qwen2-moe", "Q8_0", {"pp": 2}),  # qwen2moe, dequantized; the second stage reads only its layers' tensors
    ("qwen3-moe", "Q4_0", {"ep": 2}),  # whole int4 experts per rank
]


@pytest.mark.parametrize("name,ftype,options", GGUF_CASES, ids=[f"{n}-{f}-{o}" for n, f, o in GGUF_CASES])
def test_gguf_file_splits_like_one_process(checkpoint, split_run, tmp_path_factory, name, ftype, options):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "gguf"))
    from hf_to_gguf import convert

    path = tmp_path_factory.mktemp("gguf") / f"{name}-{ftype}.gguf"
    convert(checkpoint(name)[0], path, ftype, return_weights=False)
    reference, split = split_run(path, {}), split_run(path, options)
    assert split["tokens"] == reference["tokens"]
    diff = max_logit_diff(split, reference)
    print(f"{name} {ftype} GGUF {options}: max |logit diff| = {diff:.2e}")
    assert diff < TOLERANCE
    assert split["expert_load"] == reference["expert_load"]
