"""Which instruction set shoal's CPU kernels are compiled for: a cap on the ISA level, one per process.

The C sources (csrc/) hold portable C next to ISA-specific paths chosen at compile time (`#ifdef
__AVX512F__`, SHOAL_VNNI, SHOAL_AMX). By default they are built with `-march=native`, so they take every
extension the host has. Capping the level builds the same sources without the extensions above it:

    native    everything the host has (AMX tiles, AVX-512 with BF16 / VNNI, AVX2 ...)
    avx512    AVX-512 and its BF16 / VNNI extensions where the host has them, no AMX
    avx2      AVX2 + FMA + F16C, no AVX-512 (the vector width of Zen 1-3 and of most laptops)
    portable  baseline x86-64 / armv8-a: the C reference code, auto-vectorized for the baseline only

Every level the host can run is a path users' machines take, so the tests force each of them
(tests/backends/test_cpu_isa.py). Weights are re-laid out for the kernels that loaded, and the
library is loaded once per process: the level is chosen before the first model is built, from
EngineConfig.cpu_isa (`--cpu-isa`), else SHOAL_CPU_ISA, else native.
"""

from __future__ import annotations

import os
import platform

from shoal.backends.ops import ISA_LEVELS as LEVELS
from shoal.errors import ConfigError

ENV = "SHOAL_CPU_ISA"
_NO_AMX = ["-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"]
_NEEDS = {"avx512": "avx512f", "avx2": "avx2"}  # the /proc/cpuinfo flag an x86 level cannot run without

_chosen: str | None = None  # the level of this process, fixed when the kernels load


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


def _host_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":")[0].strip() in ("flags", "Features"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def compiler_flags(level: str) -> list[str]:
    """The -m flags for `level` on this host's architecture."""
    if level == "native":
        return ["-march=native"]
    if not _x86():  # ARM and others: native or the baseline
        return ["-march=native"] if level != "portable" else []
    if level == "avx512":
        return ["-march=native", *_NO_AMX]
    if level == "avx2":
        return ["-march=native", "-mno-avx512f", *_NO_AMX]  # -mno-avx512f drops every AVX-512 subset
    return ["-march=x86-64"]


def runnable_levels() -> list[str]:
    """Every level this host can run."""
    flags = _host_flags()
    if not _x86():
        return ["native", "portable"]
    return [lvl for lvl in LEVELS if lvl not in _NEEDS or _NEEDS[lvl] in flags]


def host_levels() -> list[str]:
    """The levels this host can run that each build different code from the level above them (what
    the tests force)."""
    flags = _host_flags()
    if not _x86():
        return ["native", "portable"]
    levels = ["native"]
    if "avx512f" in flags and {"amx_tile", "amx_bf16", "amx_int8"} & flags:
        levels.append("avx512")
    if "avx2" in flags and "avx512f" in flags:
        levels.append("avx2")
    levels.append("portable")
    return levels


def check(level: str) -> str:
    """`level`, or a ConfigError that says what is accepted (and what this host cannot run)."""
    if level not in LEVELS:
        raise ConfigError(f"unknown CPU ISA level {level!r}; choose one of {', '.join(LEVELS)}")
    flags = _host_flags()
    needs = _NEEDS.get(level)
    if _x86() and needs and flags and needs not in flags:
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
