"""shoal's ARM kernels (shoal/backends/cpu/csrc/arm/) on any host: the levels and compiler flags the build step
picks on aarch64 (the machine and /proc/cpuinfo faked), and the NEON and dot-product kernels bit for bit
against the portable C, cross-compiled with Debian's gcc-aarch64-linux-gnu and run under qemu-user (skipped
where either is absent: `apt-get install gcc-aarch64-linux-gnu qemu-user libc6-arm64-cross`). qemu does not
time like a CPU: this checks results, never speed."""

from __future__ import annotations

import platform
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from shoal.backends.cpu import build, isa, library
from shoal.backends.ops import ISA_LEVELS
from shoal.errors import ConfigError

CROSS, QEMU = "aarch64-linux-gnu-gcc", "qemu-aarch64"
DRIVER = Path(__file__).with_name("arm_kernels.c")
# /proc/cpuinfo "Features" of a Neoverse N1 (Graviton2: dot products) and a Cortex-A72 (Graviton1: none)
N1 = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs"
A72 = "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"


def _on_arm(monkeypatch, features: str) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(isa, "_host_flags", lambda: set(features.split()))


def test_every_level_of_every_architecture_is_a_config_choice():
    assert {lvl for table in isa._LEVELS.values() for lvl, _, _ in table} == set(ISA_LEVELS)


def test_an_arm_cpu_with_dot_products(monkeypatch):
    _on_arm(monkeypatch, N1)
    assert isa.arch() == "arm" and isa.levels() == ["native", "dotprod", "neon", "portable"]
    assert isa.runnable_levels() == ["native", "dotprod", "neon", "portable"]
    assert isa.host_levels() == ["native", "neon", "portable"]  # native takes the dot products; neon does not
    assert isa.compiler_flags("native") == ["-march=native"]
    assert isa.compiler_flags("dotprod") == ["-march=armv8.2-a+dotprod"]
    assert isa.compiler_flags("neon") == ["-march=armv8-a"]
    assert isa.compiler_flags("portable") == ["-march=armv8-a+nosimd"]
    assert library.sources()[-1] == library.CSRC / "arm" / "matmul_rows.c"
    with pytest.raises(ConfigError, match="avx512 is not a level of this aarch64 CPU; choose one of native, dotprod"):
        isa.check("avx512")


def test_an_arm_cpu_without_dot_products(monkeypatch):
    _on_arm(monkeypatch, A72)
    assert isa.runnable_levels() == ["native", "neon", "portable"]
    assert isa.host_levels() == ["native", "portable"]
    with pytest.raises(ConfigError, match="no ASIMDDP.*choose one of native, neon, portable"):
        isa.check("dotprod")


def test_other_machines_pick_their_sources():
    assert library.sources("x86_64")[-1].parent.name == "x86"
    assert library.sources("arm64")[-1].parent.name == "arm"
    assert library.sources("riscv64")[-1].parent.name == "generic"


def test_the_build_step_compiles_the_arm_sources_with_the_level_flags(monkeypatch, tmp_path):
    """build._build on a faked aarch64: the command it runs (recorded, not run) names arm/ and the level's
    -march, and the cache entry is per level."""
    _on_arm(monkeypatch, N1)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    commands = []

    def fake_run(cmd, **kwargs):
        commands.append(cmd)
        Path(cmd[cmd.index("-o") + 1]).write_bytes(b"")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(build.subprocess, "run", fake_run)
    targets = {level: build._build(library.sources(), "cc", level) for level in ("dotprod", "neon", "portable")}
    assert len(set(targets.values())) == 3 and all("-" + lvl + "-" in t.name for lvl, t in targets.items())
    for cmd, level in zip(commands, targets):
        assert cmd[0] == "cc" and isa.compiler_flags(level)[0] in cmd and "-ffp-contract=off" in cmd
        assert str(library.CSRC / "arm" / "matmul_rows.c") in cmd and not any("/x86/" in arg for arg in cmd)


needs_cross = pytest.mark.skipif(not shutil.which(CROSS), reason=f"no {CROSS} here (apt-get install gcc-aarch64-linux-gnu)")


@needs_cross
@pytest.mark.parametrize("level", ["dotprod", "neon", "portable"])
def test_every_library_source_compiles_for_aarch64(monkeypatch, level):
    """What the build step compiles on aarch64 (fused.c, experts.c, replay.c too), at each level's flags:
    without x86-only code outside its #ifdefs (syntax and types only: fast)."""
    _on_arm(monkeypatch, N1)
    flags = [f for f in build.FLAGS if f not in ("-shared", "-fPIC", "-O3")]
    _compile([CROSS, *flags, *isa.compiler_flags(level), "-Werror=implicit-function-declaration", "-fsyntax-only",
              *map(str, library.sources())])


def _compile(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _run(cmd: list[str]) -> dict[str, str]:
    """The driver's output lines as {case: hex bytes}, its "features" line under "features"."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{cmd[-1]}: {done.stderr[-3000:]}"
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert len(lines) > 80, done.stdout[:2000]
    return lines


def _same_bits(ours: dict[str, str], reference: dict[str, str], what: str) -> None:
    assert ours.keys() == reference.keys()
    for case, bits in reference.items():
        if case != "features" and ours[case] != bits:
            first = next(i for i, (a, b) in enumerate(zip(ours[case], bits)) if a != b) // 2
            raise AssertionError(f"{what}: {case} differs from the portable code from byte {first} on")


@needs_cross
@pytest.mark.skipif(not shutil.which(QEMU), reason=f"no {QEMU} here (apt-get install qemu-user libc6-arm64-cross): "
                                                   "the ARM kernels are not run")
def test_neon_kernels_give_the_portable_bits_under_qemu(monkeypatch, tmp_path):
    """Every matrix-vector, many-products and batched-rows entry point in every weight format, built at each
    ARM level with the flags the build step uses there, on the same inputs: NEON, and NEON with int8 dot
    products, against the portable build; and the portable code on this host gives the same bits as on ARM. The driver also checks each result against a
    double-precision product, so two builds cannot agree on a wrong one."""
    host_portable = isa.compiler_flags("portable")
    _on_arm(monkeypatch, N1)
    csrc = library.CSRC
    common = [f for f in build.FLAGS if f not in ("-shared", "-fPIC")] + [f"-I{csrc}"]
    kernels = [str(csrc / "gemv.c"), str(csrc / "arm" / "matmul_rows.c")]
    driver = tmp_path / "driver.o"  # its own build at -O1: gcc 12's vectorizer trips over it at -O3 +nosimd
    _compile([CROSS, "-O1", "-std=c11", f"-I{csrc}", "-c", "-o", str(driver), str(DRIVER)])
    # name: the level's flags. The reference at -O1, which compiles gemv.c 5x faster: C's semantics (no
    # fast-math, no contraction) fix its bits at any -O; the NEON builds keep the build step's -O3.
    reference = ["-O1"]
    builds = {"portable": [*isa.compiler_flags("portable"), *reference], "neon": isa.compiler_flags("neon"),
              "dotprod": isa.compiler_flags("dotprod")}
    commands = [[CROSS, *common, *flags, "-static", "-o", str(tmp_path / name), str(driver), *kernels, "-lm"]
                for name, flags in builds.items()]
    host = shutil.which("cc") or shutil.which("gcc")
    if host and platform.machine() != "aarch64":
        monkeypatch.undo()
        commands.append([host, *common, *host_portable, *reference, "-o", str(tmp_path / "host_portable"), str(DRIVER),
                         *kernels, "-lm"])
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(_compile, commands))
    with ThreadPoolExecutor(2) as pool:
        out = dict(zip(builds, pool.map(lambda name: _run([QEMU, str(tmp_path / name)]), builds)))
    features = {name: int(lines["features"]) for name, lines in out.items()}
    assert features["portable"] == 1  # int8 activations on every ISA; plain C lanes; no batched kernels
    assert features["neon"] == 1 | 4 | 64  # batched rows, NEON lanes
    assert features["dotprod"] == 1 | 4 | 64 | 128  # and the dot products
    _same_bits(out["neon"], out["portable"], "NEON")
    _same_bits(out["dotprod"], out["portable"], "NEON with dot products")
    if len(commands) > len(builds):
        _same_bits(_run([str(tmp_path / "host_portable")]), out["portable"], f"portable C on {platform.machine()}")
