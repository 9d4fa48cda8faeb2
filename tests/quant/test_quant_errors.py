"""Bad quantization requests end in a clear error."""

from __future__ import annotations

import pytest

from shoal import LLM
from shoal.cli import main
from shoal.config import EngineConfig
from shoal.errors import ConfigError


def test_bad_quant_and_group_size():
    with pytest.raises(ConfigError, match="int8, int4, fp8"):
        EngineConfig(quant="int3")
    with pytest.raises(ConfigError, match="32, 64, 128"):
        EngineConfig(quant="int4", quant_group_size=48)


def test_group_size_that_does_not_divide_a_layer(checkpoint):
    src, _ = checkpoint("llama")  # hidden 64
    with pytest.raises(ConfigError, match=r"does not divide the input size 64 .*--group-size 64"):
        LLM(str(src), progress=False, quant="int4", quant_group_size=128)


def test_cli_errors_exit_2(checkpoint, tmp_path, capsys):
    src, _ = checkpoint("llama")
    assert main(["quantize", "--model", str(src), "--out", str(src), "--quant", "int8"]) == 2
    assert "different folder" in capsys.readouterr().err
    assert main(["generate", "--model", str(src), "--quant", "int4", "--group-size", "128", "hi"]) == 2
    assert "does not divide" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--quant", "int5", "hi"])
