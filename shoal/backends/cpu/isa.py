"""Which instruction set shoal's CPU kernels are compiled for: a cap on the ISA level, one per process.

The C sources (csrc/) hold portable C next to ISA-specific paths chosen at compile time (`#ifdef
__AVX512F__`, SHOAL_VNNI, SHOAL_AMX; lanes.h's NEON block and __ARM_FEATURE_DOTPROD on ARM). By default they are built with
`-march=native`, so they take every extension the host has. Capping the level builds the same sources
without the extensions above it. On x86-64:

    native    everything the host has (AMX tiles, AVX-512 with BF16 / VNNI, AVX2 ...)
    avx512    AVX-512 and its BF16 / VNNI extensions where the host has them, no AMX
    avx2      AVX2 + FMA + F16C, no AVX-512 (the vector width of Zen 1-3 and of most laptops)
    portable  baseline x86-64: the C reference code, auto-vectorized for the baseline only

On aarch64 (Graviton, Kunpeng, Ampere, Apple silicon under Linux):

    native    everything the host has (NEON, and its int8 dot products where present)
    dotprod   armv8.2-a + int8 dot products (vdotq_s32, "asimddp" in /proc/cpuinfo)
    neon      armv8-a: NEON lanes, int8 products by widening multiplies (the same sums)
    portable  armv8-a without NEON (+nosimd): the C reference code, scalar

Other architectures have native and portable. Every level the host can run is a path users' machines
take, so the tests force each of them (tests/backends/test_cpu_isa.py), and the ARM ones are checked bit
for bit against the portable code under qemu-user on any host (tests/backends/test_cpu_arm.py). Weights are
re-laid out for the kernels that loaded, and the library is loaded once per process: the level is chosen
before the first model is built, from EngineConfig.cpu_isa (`--cpu-isa`), else SHOAL_CPU_ISA, else native.
"""

from __future__ import annotations

import os
import platform

from shoal.backends.ops import ISA_LEVELS
from shoal.errors import ConfigError

ENV = "SHOAL_CPU_ISA"
_NO_AMX = ["-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"]
# Per architecture: each level, the /proc/cpuinfo flag it cannot run without (None: any CPU of the kind)
# and its compiler flags, highest level first.
_LEVELS: dict[str, tuple[tuple[str, str | None, list[str]], ...]] = {
    "x86": (("native", None, ["-march=native"]),
            ("avx512", "avx512f", ["-march=native", *_NO_AMX]),
            ("avx2", "avx2", ["-march=native", "-mno-avx512f", *_NO_AMX]),  # -mno-avx512f: every AVX-512 subset
            ("portable", None, ["-march=x86-64"])),
    "arm": (("native", None, ["-march=native"]),
            ("dotprod", "asimddp", ["-march=armv8.2-a+dotprod"]),
            ("neon", "asimd", ["-march=armv8-a"]),
            ("portable", None, ["-march=armv8-a+nosimd"])),
    "other": (("native", None, ["-march=native"]), ("portable", None, [])),
}

_chosen: str | None = None  # the level of this process, fixed when the kernels load


def arch(machine: str | None = None) -> str:
    """"x86", "arm" (aarch64) or "other", for `machine` (default: this host's platform.machine())."""
    machine = (machine if machine is not None else platform.machine()).lower()
    if machine in ("x86_64", "amd64", "i686", "i386"):
        return "x86"
    return "arm" if machine in ("aarch64", "arm64") else "other"


def _x86() -> bool:
    return arch() == "x86"


def cpuinfo() -> dict[str, str]:
    """/proc/cpuinfo as {lower-case key: value}, each key's first occurrence (the first CPU's, and aarch64's
    trailing "hardware"); empty where the file is absent (macOS, Windows). The one reader of that file."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep:
                    fields.setdefault(key.strip().lower(), value.strip())
    except OSError:
        pass
    return fields


def _host_flags() -> set[str]:
    info = cpuinfo()
    return set((info.get("flags") or info.get("features") or "").split())


def levels() -> list[str]:
    """The levels of this host's architecture, highest first."""
    return [lvl for lvl, _, _ in _LEVELS[arch()]]


def _needs(level: str) -> str | None:
    return next((needs for lvl, needs, _ in _LEVELS[arch()] if lvl == level), None)


def compiler_flags(level: str) -> list[str]:
    """The -march / -m flags for `level` on this host's architecture."""
    return next(list(flags) for lvl, _, flags in _LEVELS[arch()] if lvl == level)


def runnable_levels() -> list[str]:
    """Every level this host can run."""
    flags = _host_flags()
    return [lvl for lvl, needs, _ in _LEVELS[arch()] if needs is None or needs in flags]


def host_levels() -> list[str]:
    """The levels this host can run that each build different code from the level above them (what
    the tests force)."""
    flags, kind = _host_flags(), arch()
    levels = ["native"]
    if kind == "x86":
        if "avx512f" in flags and {"amx_tile", "amx_bf16", "amx_int8"} & flags:
            levels.append("avx512")
        if "avx2" in flags and "avx512f" in flags:
            levels.append("avx2")
    elif kind == "arm" and "asimddp" in flags:  # native takes the dot products; neon is what CPUs without take
        levels.append("neon")
    levels.append("portable")
    return levels


def check(level: str) -> str:
    """`level`, or a ConfigError that says what is accepted (and what this host cannot run)."""
    if level not in levels():
        what = f"{level} is not a level of this {platform.machine()} CPU" if level in ISA_LEVELS else (
            f"unknown CPU ISA level {level!r}")
        raise ConfigError(f"{what}; choose one of {', '.join(levels())}")
    flags = _host_flags()
    needs = _needs(level)
    if needs and flags and needs not in flags:
        raise ConfigError(f"this CPU has no {needs.upper()}, so kernels capped at {level} cannot run here; "
                          f"choose one of {', '.join(runnable_levels())}")
    return level


def default_level() -> str:
    return os.environ.get(ENV, "").strip().lower() or "native"


def choose(level: str | None) -> str:
    """Fix this process's level (None: SHOAL_CPU_ISA, else native). The kernels load once: asking for
    another level afterwards is refused rather than silently ignored."""
    global _chosen
    if level is None and _chosen is not None:
        return _chosen
    level = check(level or default_level())
    if _chosen is None:
        _chosen = level
    elif level != _chosen:
        raise ConfigError(f"shoal's CPU kernels in this process are built for ISA level {_chosen!r}; the level is "
                          f"one per process: start another process for {level!r} (--cpu-isa / SHOAL_CPU_ISA)")
    return _chosen


def chosen() -> str:
    """The level the kernels are (or will be) built for: fixed at the first call."""
    return choose(None)
