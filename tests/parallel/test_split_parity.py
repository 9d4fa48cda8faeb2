"""Every split reproduces one process: same greedy tokens, logits within 1e-4 (float32, gloo on CPU);
a quantized split reproduces one process quantized the same way."""

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
