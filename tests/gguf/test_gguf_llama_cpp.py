"""Files quantized by llama.cpp's own quantizer (llama-cpp-python's llama_model_quantize, every preset from
Q2_K to Q8_0 plus IQ4_NL / IQ4_XS) load with each weight equal to gguf.quants.dequantize; the model equals
transformers reading the same file; and teacher-forced greedy tokens agree with llama.cpp running the same
file. Skipped where llama-cpp-python is not installed (benchmarks/compare_cpu.py installs it)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from hf_to_gguf import convert
from shoal import LLM, SamplingParams
from shoal.gguf import GGUFFile
from shoal.quant.layers import QuantizedLinear
from gguf_reference import HEADS, IDS, KV_HEADS, check_exact, load_recording, shoal_logits, transformers_from_gguf

llama_cpp = pytest.importorskip("llama_cpp")

# preset -> the GGUF types a file of it holds for the 256-wide test model (checked, so a llama.cpp that
# changes its mixes shows up here rather than as silently untested types)
PRESETS = {
    "Q2_K": {"Q2_K", "Q3_K", "Q6_K"},
    "Q3_K_M": {"Q3_K", "Q4_K", "Q5_K", "Q6_K"},
    "Q4_0": {"Q4_0", "Q6_K"},
    "Q4_1": {"Q4_1", "Q6_K"},
    "Q4_K_M": {"Q4_K", "Q6_K"},
    "Q5_0": {"Q5_0", "Q6_K"},
    "Q5_1": {"Q5_1", "Q6_K"},
    "Q5_K_M": {"Q5_K", "Q6_K"},
    "Q6_K": {"Q6_K"},
    "Q8_0": {"Q8_0"},
    "IQ4_NL": {"IQ4_NL", "Q6_K"},
    "IQ4_XS": {"IQ4_XS", "Q6_K"},
}
TEACHER_FORCED = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
POSITIONS = 64
# llama.cpp logs through a Python callback that chokes on the test vocabulary's bytes; keep it quiet
# (a module-level reference: ctypes must not free the callback while llama.cpp holds it)
_QUIET = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p())


@pytest.fixture(scope="session")
def quantized(llama_256, tmp_path_factory):
    """quantized(preset) -> the llama-256 checkpoint, converted to F32 GGUF, quantized by llama.cpp."""
    folder = tmp_path_factory.mktemp("llama-cpp")
    source = folder / "llama-256-F32.gguf"
    convert(llama_256[0], source, "F32", return_weights=False)
    files: dict[str, object] = {}

    def get(preset: str):
        if preset not in files:
            out = folder / f"llama-256-{preset}.gguf"
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{preset}")
            params.nthread = 2
            code = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
            assert code == 0, f"llama_model_quantize({preset}) failed with {code}"
            files[preset] = out
        return files[preset]

    return get


def _matrix_types(path) -> set[str]:
    return {t.type_name for t in GGUFFile(path).tensors.values() if len(t.shape) == 2}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_llama_cpp_presets_load_exactly(quantized, preset, monkeypatch):
    path = quantized(preset)
    assert _matrix_types(path) == PRESETS[preset]
    model, seen = load_recording(path, monkeypatch)
    counts = check_exact(path, seen, HEADS, KV_HEADS)
    int4 = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if preset in ("Q4_0", "Q4_1", "Q4_K_M"):  # mostly 4-bit: int4 layers hold the file's codes
        assert any(kind.endswith("->int4") for kind in counts) and all(m.fmt == "int4" for m in int4)
        assert "Q6_K" in counts  # the output head (and Q4_K_M's attn_v / ffn_down) load as they are
    else:
        assert not int4
    with torch.no_grad():
        theirs = transformers_from_gguf(path)(IDS).logits[0]
    assert (shoal_logits(model, IDS) - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("preset", TEACHER_FORCED)
def test_greedy_tokens_teacher_forced_agree_with_llama_cpp(quantized, preset):
    path = quantized(preset)
    prompt = [int(t) for t in np.random.default_rng(0).integers(2, 300, 8)]
    ours = LLM(str(path), dtype="float32", progress=False)
    greedy = ours.generate([prompt], SamplingParams(temperature=0, max_tokens=POSITIONS, ignore_eos=True))[0]
    sequence = prompt + list(greedy.token_ids)
    ids = torch.tensor(sequence[:-1])[None]
    our_logits = shoal_logits(ours.model, ids)[len(prompt) - 1 :]
    theirs = llama_cpp.Llama(str(path), n_ctx=128, n_batch=128, logits_all=True, n_threads=2, verbose=False)
    theirs.eval(sequence[:-1])
    their_logits = torch.from_numpy(np.array(theirs.scores[len(prompt) - 1 : len(sequence) - 1], dtype=np.float32))
    assert our_logits.shape == their_logits.shape == (POSITIONS, their_logits.shape[1])
    a, b = our_logits.argmax(-1), their_logits.argmax(-1)
    differ = [
        f"position {i}: shoal {int(a[i])} / llama.cpp {int(b[i])}, margin {float(our_logits[i, a[i]] - our_logits[i, b[i]]):.4f} "
        f"(shoal) / {float(their_logits[i, b[i]] - their_logits[i, a[i]]):.4f} (llama.cpp)"
        for i in range(POSITIONS)
        if a[i] != b[i]
    ]
    print(f"{preset}: {POSITIONS - len(differ)}/{POSITIONS} agree; near-ties that differ: {differ or 'none'}")
    assert len(differ) <= POSITIONS * 5 // 100, differ


@pytest.mark.parametrize("preset,quant", [("Q5_K_M", "int8"), ("Q4_K_M", "int4")])
def test_quant_requantizes_a_k_quant_file_tensor_by_tensor(quantized, preset, quant, monkeypatch):
    path = quantized(preset)
    exact, _ = load_recording(path, monkeypatch)
    model, seen = load_recording(path, monkeypatch, quant=quant)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert layers and {m.fmt for m in layers} >= {quant}
    if quant == "int4":  # --quant int4 on a 4-bit file keeps its groups of 32: the Q4_K tensors pass as they are
        assert all(m.group_size == 32 for m in layers if m.fmt == "int4")
        assert sum(type(v).__name__ == "Int4GroupWeight" for _, v in seen) > 0
    ours, reference = shoal_logits(model, IDS), shoal_logits(exact, IDS)
    # one more rounding (Q5_K / Q6_K to int8 or int4 g32, the embeddings to int8), small next to the
    # logits: measured 2.7% (int8) and 7.1% (int4, its Q6_K layers rounded to 4 bits) mean relative change
    bound = {"int8": 0.05, "int4": 0.12}[quant]
    assert (ours - reference).abs().mean() < bound * reference.abs().mean()
