"""The ISA levels of shoal's CPU kernels (shoal/backends/cpu/isa.py): every level this host can run is a
path some user's machine takes, so each is forced here in a process of its own and its kernels and its
replayed decode steps are tested as the native ones are; and without a C compiler the engine still runs
and still matches transformers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shoal.backends.cpu import isa
from shoal.errors import ConfigError

TESTS = Path(__file__).resolve().parent.parent


def test_levels_this_host_runs():
    runnable = isa.runnable_levels()
    assert runnable[0] == "native" and runnable[-1] == "portable"
    assert set(isa.host_levels()) <= set(runnable)
    assert isa.compiler_flags("native") == ["-march=native"]
    flags = isa._host_flags()
    if isa._x86():
        assert ("avx512" in runnable) == ("avx512f" in flags) and ("avx2" in runnable) == ("avx2" in flags)
        assert "-mno-avx512f" in isa.compiler_flags("avx2") and isa.compiler_flags("portable") == ["-march=x86-64"]


def test_bad_levels_say_what_is_accepted():
    with pytest.raises(ConfigError, match="choose one of native, avx512, avx2, portable"):
        isa.check("sse9")
    missing = [lvl for lvl in ("avx512", "avx2") if lvl not in isa.runnable_levels()]
    for level in missing:  # a level above this CPU's is refused, naming what it lacks
        with pytest.raises(ConfigError, match="this CPU has no"):
            isa.check(level)
    from shoal.config import EngineConfig
    from shoal.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="cpu_isa must be one of"):
        EngineConfig(cpu_isa="fastest")


def test_one_level_per_process(monkeypatch):
    monkeypatch.setattr(isa, "_chosen", "native")
    assert isa.choose(None) == "native" and isa.choose("native") == "native"
    with pytest.raises(ConfigError, match="one per process"):
        isa.choose("portable")


def _run(args: list[str], env: dict[str, str], timeout: float = 1200) -> subprocess.CompletedProcess:
    full = dict(os.environ, **env)
    full.pop("PYTEST_ADDOPTS", None)
    return subprocess.run([sys.executable, *args], cwd=TESTS.parent, env=full, capture_output=True, text=True,
                          timeout=timeout)


# The kernel tests and a slice of the replay tests on the kernels forced ("shoal"), which is where a capped
# level differs: Llama in every weight format, a lone sequence and eight; DeepSeek-V2-Lite's lone token.
FORCED = ["tests/backends/test_cpu_ops.py", "tests/backends/test_cpu_gemv.py", "tests/backends/test_cpu_capture.py",
          "-k", "not test_cpu_capture or (shoal and ((llama and not -16) or (v2-lite and (int4-1 or float32-None-1))))"]


@pytest.mark.parametrize("level", [lvl for lvl in isa.host_levels() if lvl != "native"])
def test_a_capped_level_passes_the_kernel_and_replay_tests(level, tmp_path):
    """The native level is what the rest of the suite runs; each lower one the host can run gets the kernel
    tests and the replay-equals-eager tests in a process built for it."""
    from shoal.backends.cpu import fused

    if not fused.available():
        pytest.skip("no C compiler here: the kernels are not built at any level")
    probe = _run(["-c", "from shoal.backends.cpu import isa, library; lib = library.kernels(); "
                        "print(isa.chosen(), lib.features)"], {isa.ENV: level})
    assert probe.returncode == 0, probe.stderr[-3000:]
    chosen, features = probe.stdout.split()
    assert chosen == level
    if level in ("avx2", "portable"):
        assert not int(features) & 16, "a level below AVX-512 built AVX-512 kernels"
    if level == "portable":
        assert not int(features) & 48, "the portable level built vector lanes"
    done = _run(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *FORCED], {isa.ENV: level})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout


def test_without_a_c_compiler_the_engine_runs_and_matches_transformers(tmp_path):
    """No compiler on PATH, none in $CC, and an empty kernel cache: every op falls back to torch's, the
    doctor says so, and the models still match transformers (the parity tests, on a slice of families)."""
    bin_dir = tmp_path / "bin"  # a PATH with the interpreter's folder only: no cc, gcc or clang
    bin_dir.mkdir()
    env = {"PATH": str(bin_dir), "CC": str(tmp_path / "no-such-cc"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    probe = _run(["-c", "from shoal.backends.cpu import fused, gemv, build; "
                        "print(build._compiler(), fused.available(), gemv.available())"], env)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert probe.stdout.split() == ["None", "False", "False"]
    done = _run(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/models/test_parity.py",
                 "tests/backends/test_cpu_capture.py", "-k", "not test_parity or llama or deepseek"], env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout
