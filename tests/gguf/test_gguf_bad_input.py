"""A GGUF file is untrusted input: every damaged or unsupported file ends in a clear ShoalError, before any
large allocation, never a crash or a hang."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest

from shoal import LLM
from shoal.cli import main
from shoal.errors import ModelNotFoundError, ShoalError, UnsupportedArchitectureError, WeightError
from shoal.gguf import GGUFFile
from shoal.loader import resolve_model_path


@pytest.fixture
def good(gguf_model, tmp_path):
    """A private copy of a small Q8_0 Llama GGUF file that a test may damage."""
    path, _, _, _ = gguf_model("llama", "Q8_0")
    copy = tmp_path / "model.gguf"
    copy.write_bytes(path.read_bytes())
    return copy


def _tensor_info_offset(path, name: str) -> int:
    """Byte offset of a tensor's description: name length, name, n_dims, dims, type, offset."""
    field = next(t.field for t in gguf.GGUFReader(str(path)).tensors if t.name == name)
    return field.offset


def _patch(path, offset: int, fmt: str, value) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into("<" + fmt, data, offset, value)
    path.write_bytes(bytes(data))


def _opens(path):
    LLM(str(path), dtype="float32", progress=False)


def test_truncated_file(good):
    data = good.read_bytes()
    for cut in (3, 40, len(data) // 3, len(data) - 10):
        good.write_bytes(data[:cut])
        with pytest.raises(WeightError, match="past the end|not a valid GGUF|truncated"):
            _opens(good)


def test_wrong_magic(good):
    data = bytearray(good.read_bytes())
    data[:4] = b"GGML"
    good.write_bytes(bytes(data))
    with pytest.raises(WeightError, match="not a GGUF file"):
        GGUFFile(good)
    with pytest.raises(ModelNotFoundError, match="not a GGUF file"):  # named otherwise, it is just a file
        resolve_model_path(good.rename(good.with_suffix(".bin")))


def test_tensor_offset_beyond_the_end(good):
    start = _tensor_info_offset(good, "blk.1.ffn_down.weight")
    name_len = len("blk.1.ffn_down.weight")
    offset_at = start + 8 + name_len + 4 + 2 * 8 + 4
    _patch(good, offset_at, "Q", 1 << 40)
    with pytest.raises(WeightError, match="blk.1.ffn_down.weight.*needs bytes"):
        _opens(good)
    _patch(good, offset_at, "Q", 3)  # inside the file but misaligned
    with pytest.raises(WeightError, match="not aligned"):
        _opens(good)


def test_tensor_shape_larger_than_the_file(good):
    start = _tensor_info_offset(good, "token_embd.weight")
    dims_at = start + 8 + len("token_embd.weight") + 4
    _patch(good, dims_at + 8, "Q", 1 << 50)  # rows
    with pytest.raises(WeightError, match="token_embd.weight"):
        _opens(good)
    _patch(good, dims_at + 8, "Q", 0)
    with pytest.raises(WeightError, match="zero dimension"):
        _opens(good)


def test_unsupported_and_unknown_tensor_types(good):
    start = _tensor_info_offset(good, "blk.0.attn_q.weight")
    type_at = start + 8 + len("blk.0.attn_q.weight") + 4 + 2 * 8
    _patch(good, type_at, "I", int(gguf.GGMLQuantizationType.IQ2_XXS))
    with pytest.raises(WeightError, match=r"type IQ2_XXS.*F32, F16, BF16, Q8_0, Q4_0.*Q4_K.*llama-quantize") as error:
        _opens(good)
    assert "\n" not in str(error.value)
    _patch(good, type_at, "I", 9999)
    with pytest.raises(WeightError, match="unknown ggml type id 9999"):
        _opens(good)


def test_huge_array_length_does_not_hang(good):
    field = gguf.GGUFReader(str(good)).fields["tokenizer.ggml.token_type"]
    count_at = field.offset + 8 + len("tokenizer.ggml.token_type") + 4 + 4
    _patch(good, count_at, "Q", 1 << 62)
    with pytest.raises(WeightError, match="token_type"):
        _opens(good)


def test_metadata_larger_than_the_tensors_is_refused_before_allocating(good):
    field = gguf.GGUFReader(str(good)).fields["llama.feed_forward_length"]
    # within config.json's sane bounds (hf_config.SIZE_BOUNDS, which refuse 10M outright), above the tensors
    _patch(good, field.offset + 8 + len("llama.feed_forward_length") + 4, "I", 1_000_000)
    with pytest.raises(WeightError, match="metadata describes a model of"):
        _opens(good)


def _tiny_gguf(path, arch: str, **tensors):
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_embedding_length(8)
    for name, arr in tensors.items():
        writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_architecture(tmp_path):
    path = _tiny_gguf(tmp_path / "m.gguf", "mamba", **{"token_embd.weight": np.zeros((4, 8), np.float32)})
    with pytest.raises(UnsupportedArchitectureError, match=r"'mamba'.*llama, qwen2, qwen3, deepseek2"):
        _opens(path)
    assert main(["generate", "--model", str(path), "hi"]) == 2


def test_missing_metadata_and_missing_tensors(tmp_path, good):
    path = _tiny_gguf(tmp_path / "m.gguf", "llama", **{"token_embd.weight": np.zeros((4, 8), np.float32)})
    with pytest.raises(ShoalError, match="llama.attention.head_count"):
        _opens(path)
    # a tensor renamed away: the model names what it lacks
    data = good.read_bytes().replace(b"blk.1.ffn_up.weight", b"blk.1.ffn_xx.weight")
    good.write_bytes(data)
    with pytest.raises(WeightError, match="model.layers.1.mlp.up_proj.weight"):
        _opens(good)
