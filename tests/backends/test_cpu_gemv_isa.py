"""Every ISA level of the matrix-vector kernels gives the portable C code's bits. The dot products are
written once against the 16 lanes of csrc/lanes.h, which AVX-512, AVX2 and portable C each implement with
the same operation in every lane; so each level this host can run is built in a process of its own
(SHOAL_CPU_ISA), runs every kernel path over the same inputs (gemv_bits.py), and must equal the portable
build bit for bit. The one exception is documented in gemv.c: bf16 weights times bf16 activations on a CPU
with AVX512-BF16 use its pair products, whose rounding is the hardware's; those are held to the portable
result within bf16 rounding instead."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shoal.backends.cpu import fused, isa

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def per_level(tmp_path_factory):
    if not fused.available():
        pytest.skip("no C compiler here: the kernels are not built at any level")
    results = {}
    for level in isa.host_levels():
        path = tmp_path_factory.mktemp(level) / "bits.pt"
        env = dict(os.environ, **{isa.ENV: level})
        done = subprocess.run([sys.executable, str(HERE / "gemv_bits.py"), str(path)], cwd=HERE.parent.parent,
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        results[level] = torch.load(path)
    return results


def test_the_portable_level_is_plain_c(per_level):
    assert per_level["portable"]["lanes"] == "portable" and not per_level["portable"]["pair_products"]
    if isa._x86() and "avx2" in isa._host_flags() and "fma" in isa._host_flags():
        assert per_level["native"]["lanes"] in ("avx2", "avx512")


@pytest.mark.parametrize("level", [lvl for lvl in isa.host_levels() if lvl != "portable"])
def test_each_level_gives_the_portable_bits(per_level, level):
    ours, reference = per_level[level], per_level["portable"]["outputs"]
    assert ours["outputs"].keys() == reference.keys()
    differ = []
    for name, ref in reference.items():
        got = ours["outputs"][name]
        if ours["pair_products"] and name.startswith("bf16-") and "bfloat16" in name and "k48" not in name \
                and "k80" not in name:  # AVX512-BF16 pair products (K % 32 == 0): the hardware's rounding
            scale = ref.float().abs().max().item()
            assert (got.float() - ref.float()).abs().max().item() <= 8e-3 * scale, name
            continue
        if got.dtype != ref.dtype or not torch.equal(got.view(torch.int16 if got.dtype == torch.bfloat16 else torch.int32),
                                                     ref.view(torch.int16 if ref.dtype == torch.bfloat16 else torch.int32)):
            differ.append(name)
    assert not differ, f"{ours['lanes']} lanes differ from the portable code in {len(differ)} of {len(reference)}: {differ[:8]}"
