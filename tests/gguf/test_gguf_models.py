"""A GGUF file written the way llama.cpp's converter writes it gives the same logits as the checkpoint
it came from: exactly for F32, and for F16 / BF16 / Q8_0 / Q4_0 the same as transformers running the
weights the file holds (dequantized). transformers' own GGUF reader is a second, outside reference."""

from __future__ import annotations

import pytest
import torch

from gguf_reference import shoal_logits
from hf_to_gguf import save_hf_folder
from shoal import LLM, SamplingParams
from shoal.backends import get_backend
from shoal.gguf import build_gguf_model
from shoal.loader import build_model

IDS = torch.arange(2, 18)[None]


def _load(path):
    model, config, _ = build_model(path, get_backend("cpu"), torch.device("cpu"), torch.float32, progress=False)
    return model, config


@pytest.mark.parametrize(
    "name", ["llama", "llama-tied-llama3-rope", "qwen3", "deepseek-v2-lite", "deepseek-v2-grouped", "deepseek-v3",
             "qwen3-moe", "qwen2-moe", "mixtral"]  # GGUF qwen3moe, qwen2moe, and llama with experts
)
def test_f32_gguf_matches_transformers_on_the_original_checkpoint(gguf_model, name):
    path, _, reference, _ = gguf_model(name, "F32")
    model, config = _load(path)
    assert config.architecture == type(reference).__name__
    with torch.no_grad():
        theirs = reference(IDS).logits[0]
    assert (shoal_logits(model, IDS) - theirs).abs().max() < 1e-4


@pytest.mark.parametrize(
    "name,ftype",
    [("llama", "F16"), ("llama", "BF16"), ("llama", "Q8_0"), ("llama", "Q4_0"), ("qwen2", "Q8_0"),
     ("deepseek-v3", "Q8_0"), ("deepseek-v3", "Q4_0"), ("deepseek-v2-lite", "BF16"), ("qwen2-moe", "Q8_0"),
     ("mixtral", "Q4_0")],
)
def test_quantized_gguf_matches_transformers_on_the_weights_it_holds(gguf_model, name, ftype, tmp_path):
    import transformers

    path, folder, reference, held = gguf_model(name, ftype)
    held_folder = save_hf_folder(folder, held, tmp_path / "held")
    dequantized = transformers.AutoModelForCausalLM.from_pretrained(held_folder, dtype=torch.float32).eval()
    model, _ = _load(path)
    with torch.no_grad():
        theirs = dequantized(IDS).logits[0]
        original = reference(IDS).logits[0]
    ours = shoal_logits(model, IDS)
    assert (ours - theirs).abs().max() < 1e-4
    assert (ours - original).abs().max() > 1e-4  # the file really is quantized


def test_older_deepseek_files_with_attn_kv_b(gguf_model):
    path, _, reference, _ = gguf_model("deepseek-v2-lite", "F32", split_kv_b=False)
    model, _ = _load(path)
    with torch.no_grad():
        assert (shoal_logits(model, IDS) - reference(IDS).logits[0]).abs().max() < 1e-4


@pytest.mark.parametrize("ftype", ["F32", "Q4_0"])
def test_transformers_reads_the_same_gguf_the_same_way(gguf_model, ftype):
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path, _, _, _ = gguf_model("llama", ftype)
    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    theirs_model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=theirs_model)["tensors"]
    theirs_model.load_state_dict(tensors, strict=True)
    model, _ = _load(path)
    with torch.no_grad():
        theirs = theirs_model(IDS).logits[0]
    assert (shoal_logits(model, IDS) - theirs).abs().max() < 1e-4


def test_llm_generates_the_same_from_gguf_and_from_the_folder(gguf_model):
    path, folder, _, _ = gguf_model("llama", "F32")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    from_gguf = LLM(str(path), dtype="float32", progress=False)
    from_folder = LLM(str(folder), dtype="float32", progress=False)
    a, b = from_gguf.generate("The quick brown", params)[0], from_folder.generate("The quick brown", params)[0]
    assert a.prompt_token_ids == b.prompt_token_ids and a.token_ids == b.token_ids and a.text == b.text
    assert from_gguf.engine.eos_token_ids == frozenset({1})


def test_cli_generate_takes_a_gguf_file(gguf_model, capsys):
    import json

    from shoal.cli import main

    path, _, _, _ = gguf_model("llama", "Q8_0")
    code = main(["generate", "--model", str(path), "--max-tokens", "4", "--temperature", "0", "--json", "Hello"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 4


def test_auto_dtype_follows_the_file(gguf_model):
    backend = get_backend("cpu")
    for ftype, expected in (("F32", torch.float32), ("Q8_0", backend.default_dtype())):
        path, _, _, _ = gguf_model("llama", ftype)
        _, _, dtype = build_gguf_model(path, backend, torch.device("cpu"), None, progress=False)
        assert dtype == expected


@pytest.mark.parametrize("name", ["llama", "deepseek-v3"])
def test_a_q4_0_file_loads_into_int4_layers_holding_its_exact_codes(gguf_model, name):
    from shoal.quant.layers import QuantizedLinear, QuantizedStackedExperts

    path, _, _, _ = gguf_model(name, "Q4_0")
    model, _ = _load(path)
    quantized = [m for m in model.modules() if isinstance(m, (QuantizedLinear, QuantizedStackedExperts))]
    assert quantized, "a Q4_0 file should load into int4 layers"
    assert all(m.fmt == "int4" and m.group_size == 32 for m in quantized)
    # Exactness (no second rounding) is test_quantized_gguf_matches_transformers_on_the_weights_it_holds,
    # which loads the same file the same way and agrees with the file's dequantized weights within 1e-4.


def test_quant_int8_requantizes_a_q8_0_file_per_channel(gguf_model):
    from shoal.quant.layers import QuantizedLinear

    path, _, _, _ = gguf_model("llama", "Q8_0")
    exact, _ = _load(path)
    int8, _, _ = build_gguf_model(path, get_backend("cpu"), torch.device("cpu"), torch.float32, progress=False,
                                  quant="int8")
    assert not any(isinstance(m, QuantizedLinear) for m in exact.modules())  # Q8_0 loads dense by default
    assert any(isinstance(m, QuantizedLinear) for m in int8.modules())
    assert (shoal_logits(exact, IDS) - shoal_logits(int8, IDS)).abs().max() < 0.1


@pytest.mark.parametrize("name", ["llama", "llama-tied-llama3-rope"])  # rope_freqs; a tied head (no output.weight)
def test_streamed_f16_conversion_writes_the_same_file_as_the_whole_one(gguf_model, name, tmp_path):
    """benchmarks/real_size.py converts checkpoints too big to hold one tensor at a time: the same tensors,
    types and values as the whole-checkpoint converter's F16 file."""
    from hf_to_gguf import convert_streaming_f16
    from shoal.gguf.reader import GGUFFile

    whole, folder, _, _ = gguf_model(name, "F16")
    streamed = tmp_path / "streamed.gguf"
    convert_streaming_f16(folder, streamed)
    a, b = GGUFFile(whole), GGUFFile(streamed)
    assert a.tensors.keys() == b.tensors.keys()
    for t in a.tensors:
        assert a.tensors[t].type_name == b.tensors[t].type_name and a.tensors[t].shape == b.tensors[t].shape
        assert bytes(a.raw(t)) == bytes(b.raw(t)), t
    assert torch.equal(shoal_logits(_load(streamed)[0], IDS), shoal_logits(_load(whole)[0], IDS))
