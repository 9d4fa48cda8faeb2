"""The bundled demo model: a real (trained) DeepSeek-V3-architecture checkpoint that loads with no
--model, matches transformers on its trained weights, and writes readable text."""

from __future__ import annotations

import re

import pytest
import torch

from shoal import LLM, SamplingParams
from shoal.cli import main
from shoal.config import DEMO_MODEL_PATH


@pytest.fixture(scope="module")
def demo():
    return LLM(progress=False)


def test_demo_model_is_bundled_and_small():
    assert (DEMO_MODEL_PATH / "config.json").is_file()
    size = sum(f.stat().st_size for f in DEMO_MODEL_PATH.iterdir())
    assert size < 20 * 2**20


def test_demo_model_is_mla_and_moe(demo):
    config = demo.model_config
    assert config.architecture == "DeepseekV3ForCausalLM"
    assert config.get("kv_lora_rank") and config.get("n_routed_experts")


def test_demo_model_matches_transformers_on_trained_weights():
    import transformers

    reference = transformers.AutoModelForCausalLM.from_pretrained(DEMO_MODEL_PATH, dtype=torch.float32).eval()
    llm = LLM(dtype="float32", progress=False)
    ids = llm.tokenizer.encode("A dictionary maps keys to values, and the list type")
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits[0]
        cache = llm.model.make_cache(1, len(ids), torch.float32, "cpu")
        ours = llm.model.compute_logits(llm.model(torch.tensor([ids]), torch.arange(len(ids))[None], cache))[0]
    assert (ours - theirs).abs().max() < 1e-4


def test_demo_model_writes_readable_text(demo):
    out = demo.generate("The list type", SamplingParams(temperature=0, max_tokens=48, ignore_eos=True))[0]
    text = out.text
    letters = sum(c.isalpha() or c.isspace() or c in ".,;:'()-" for c in text)
    assert letters / max(len(text), 1) > 0.85, text
    words = set(re.findall(r"[A-Za-z]{3,}", text))
    assert len(words) >= 5, text


def test_cli_generate_without_model_uses_the_demo(capsys):
    assert main(["generate", "--max-tokens", "16", "--seed", "0", "A string"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("A string") and len(out) > len("A string") + 5
