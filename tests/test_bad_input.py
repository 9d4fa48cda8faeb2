"""Bad input ends in a typed exception from the API and a one-line error with exit code 2 from the CLI."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from shoal import LLM
from shoal.cli import main
from shoal.errors import (
    ConfigError,
    InvalidRequestError,
    ModelNotFoundError,
    TokenizerError,
    UnsupportedArchitectureError,
    WeightError,
)


@pytest.fixture
def llama_copy(checkpoint, tmp_path):
    """A private copy of the tiny Llama checkpoint that a test may damage."""
    source, _ = checkpoint("llama")
    target = tmp_path / "model"
    shutil.copytree(source, target)
    return target


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def damage_missing_weight(path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, path / "model.safetensors")


def damage_wrong_shape(path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:-1]
    save_file(tensors, path / "model.safetensors")


def damage_truncate(path):
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def damage_tokenizer_vocab(path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.add_tokens([f"<extra_{i}>" for i in range(200)])  # 300 + 200 tokens > the model's 384
    tok.save(str(path / "tokenizer.json"))


def damage_no_architectures(path):
    edit_config(path, architectures=None)


def damage_unknown_architecture(path):
    edit_config(path, architectures=["GPT2LMHeadModel"])


def damage_pickle_only(path):
    (path / "model.safetensors").rename(path / "pytorch_model.bin")


CASES = [
    (damage_no_architectures, ConfigError, "architectures"),
    (damage_unknown_architecture, UnsupportedArchitectureError, "LlamaForCausalLM"),
    (damage_missing_weight, WeightError, "model.layers.1.mlp.down_proj.weight"),
    (damage_wrong_shape, WeightError, "k_proj"),
    (damage_truncate, WeightError, "truncated"),
    (damage_tokenizer_vocab, TokenizerError, "vocab_size"),
    (damage_pickle_only, WeightError, "safetensors"),
]


@pytest.mark.parametrize("damage, error, needle", CASES, ids=[c[0].__name__ for c in CASES])
def test_damaged_checkpoint_raises_typed_error_and_cli_exits_2(llama_copy, capsys, damage, error, needle):
    damage(llama_copy)
    with pytest.raises(error) as info:
        LLM(str(llama_copy), device="cpu", progress=False)
    assert needle in str(info.value)

    code = main(["generate", "--model", str(llama_copy), "--device", "cpu", "hello"])
    captured = capsys.readouterr()
    assert code == 2
    # Split on carriage returns too: that is where a terminal starts the line after a progress bar.
    lines = [line for line in re.split(r"[\r\n]", captured.err) if line.startswith("shoal: error:")]
    assert len(lines) == 1 and needle in lines[0]
    assert "Traceback" not in captured.err


def test_unsupported_architecture_lists_supported_ones(llama_copy):
    damage_unknown_architecture(llama_copy)
    with pytest.raises(UnsupportedArchitectureError) as info:
        LLM(str(llama_copy), progress=False)
    for name in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM",
                 "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"):
        assert name in str(info.value)


def test_missing_folder(tmp_path, capsys):
    with pytest.raises(ModelNotFoundError):
        LLM(str(tmp_path / "nowhere"), progress=False)
    assert main(["generate", "--model", str(tmp_path / "nowhere"), "hi"]) == 2
    assert "no checkpoint folder" in capsys.readouterr().err


def test_cli_subprocess_prints_no_traceback(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "shoal", "generate", "--model", str(tmp_path / "nowhere"), "hi"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("shoal: error:")
    assert "Traceback" not in result.stderr


def test_bad_requests(checkpoint, capsys):
    path, _ = checkpoint("llama")
    llm = LLM(str(path), device="cpu", dtype="float32", progress=False)
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        llm.generate([1, 2, 10_000])
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate([[]])
    with pytest.raises(InvalidRequestError, match="context"):
        llm.generate([[5] * 300])
    assert main(["generate", "--model", str(path), "--prompt-ids", "1,x"]) == 2
    assert "comma-separated" in capsys.readouterr().err
    assert main(["generate", "--model", str(path)]) == 2
    assert "exactly one" in capsys.readouterr().err
    assert main(["generate", "--model", str(path), "--temperature", "-1", "hi"]) == 2
    assert "temperature" in capsys.readouterr().err
