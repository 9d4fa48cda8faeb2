"""Every GGUF type gguf's own writer makes (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, F16, BF16) loads, each weight
equal to gguf.quants.dequantize exactly, and the model equals transformers reading the same file; split
sets load; damaged 4-bit and K-quant blocks end in a one-line error. The llama.cpp-quantized files (the
K-quants, IQ4) are tests/gguf/test_gguf_llama_cpp.py."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from hf_to_gguf import convert
from shoal import LLM
from shoal.errors import WeightError
from shoal.gguf import GGUFFile, q4_k_blocks
from shoal.gguf.loader import _int4, _tensor
from shoal.quant.layers import QuantizedLinear
from gguf_reference import HEADS, IDS, KV_HEADS, check_exact, load_recording, shoal_logits, transformers_from_gguf

@pytest.mark.parametrize("ftype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16"])
def test_gguf_writer_types_load_exactly(written, ftype, monkeypatch):
    path = written(ftype)
    model, seen = load_recording(path, monkeypatch)
    counts = check_exact(path, seen, HEADS, KV_HEADS)
    int4 = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if ftype in ("Q4_0", "Q4_1"):  # straight into int4 group 32, every matrix (the writer uses one type)
        assert counts[f"{ftype}->int4"] == 2 * 7 and int4 and all(m.fmt == "int4" and m.group_size == 32 for m in int4)
    else:
        assert not int4 and counts[ftype] == 2 * 7 + 2
    with torch.no_grad():
        theirs = transformers_from_gguf(path)(IDS).logits[0]
    assert (shoal_logits(model, IDS) - theirs).abs().max() < 1e-4


def test_a_split_gguf_loads_from_its_first_part(llama_256, written, tmp_path):
    whole = written("Q8_0")
    convert(llama_256[0], tmp_path / "model.gguf", "Q8_0", return_weights=False, split_max_tensors=8)
    parts = sorted(tmp_path.glob("model-*-of-*.gguf"))
    assert len(parts) == 3 and parts[0].name == "model-00001-of-00003.gguf"
    split_file = GGUFFile(parts[0])
    assert len(split_file.tensors) == len(GGUFFile(whole).tensors) and split_file.paths == parts
    params = dict(dtype="float32", progress=False)
    a, b = LLM(str(parts[0]), **params), LLM(str(whole), **params)
    assert torch.equal(shoal_logits(a.model, IDS), shoal_logits(b.model, IDS))
    assert a.tokenizer.encode("hello world") == b.tokenizer.encode("hello world")
    with pytest.raises(WeightError, match=r"part 2 of a split GGUF file; pass the first part, model-00001-of-00003"):
        GGUFFile(parts[1])
    parts[2].unlink()
    with pytest.raises(WeightError, match=r"split in 3 files but model-00003-of-00003.gguf is not beside it"):
        GGUFFile(parts[0])


def _q4_k(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Valid Q4_K bytes [rows, cols / 256 * 144]: random codes and 6-bit scales, small finite d and dmin."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows * cols // 256, 144), dtype=np.uint8)
    blocks[:, 0:2] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    blocks[:, 2:4] = np.frombuffer(np.float16(0.001).tobytes(), np.uint8)
    return blocks.reshape(rows, -1)


def _write(path, **tensors):
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_q4_k_blocks_are_eight_int4_groups_of_32(tmp_path):
    raw = _q4_k(8, 512)
    values, scales, offsets = q4_k_blocks(raw)
    assert values.shape == (8, 512) and scales.shape == offsets.shape == (8, 16) and int(values.max()) <= 15
    w = values.float().view(8, 16, 32) * scales[..., None] + offsets[..., None]
    assert torch.equal(w.view(8, 512), torch.from_numpy(gguf.quants.dequantize(raw, T.Q4_K)))
    file = GGUFFile(_write(tmp_path / "k.gguf", q4k=(raw, T.Q4_K)))
    assert torch.equal(_int4(file, "q4k").unpacked(), values)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the inf scale, on its way to the error
def test_damaged_k_quant_blocks_get_a_one_line_error(tmp_path):
    raw = _q4_k(4, 256)
    path = _write(tmp_path / "k.gguf", a=(raw, T.Q4_K), b=(raw.copy(), T.Q4_K))
    data = path.read_bytes()
    # a super-block cut short: the file ends inside the last tensor
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 100])
    with pytest.raises(WeightError, match=r"tensor 'b' \(Q4_K, shape \[4, 256\]\) needs bytes .* but the file has") as e:
        GGUFFile(tmp_path / "cut.gguf")
    assert "\n" not in str(e.value) and "truncated" in str(e.value)
    # a block whose fp16 scale is inf: decoding gives inf / NaN, refused rather than loaded
    file = GGUFFile(path)
    start = file.tensors["b"].offset
    damaged = bytearray(data)
    damaged[start : start + 2] = np.float16(np.inf).tobytes()
    (tmp_path / "inf.gguf").write_bytes(bytes(damaged))
    file = GGUFFile(tmp_path / "inf.gguf")
    for read in (lambda: _int4(file, "b"), lambda: _tensor(file, "b", torch.float32)):
        with pytest.raises(WeightError, match=r"tensor b \(Q4_K\) decodes to non-finite values.*download or convert"):
            read()
    assert torch.isfinite(_tensor(file, "a", torch.float32)).all()


def test_k_quant_rows_that_are_not_whole_super_blocks_are_refused(tmp_path):
    path = _write(tmp_path / "k.gguf", a=(_q4_k(4, 256), T.Q4_K))
    file = GGUFFile(path)
    data = bytearray(path.read_bytes())
    dims_at = data.index(b"\x01\x00\x00\x00\x00\x00\x00\x00a") + 9 + 4  # name "a", then n_dims, then dims
    data[dims_at : dims_at + 8] = (128).to_bytes(8, "little")  # rows of 128: half a super-block
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    assert file.tensors["a"].shape == (4, 256)
    with pytest.raises(WeightError, match=r"tensor 'a' of type Q4_K has rows of 128 values, not a whole number of Q4_K's 256-value blocks"):
        GGUFFile(tmp_path / "bad.gguf")
