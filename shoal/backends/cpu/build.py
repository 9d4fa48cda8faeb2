"""Build and load shoal's C kernels for the CPU (csrc/*.c, as one library) at first use.

The C files are compiled with the system's C compiler (`-O3 -march=native -fopenmp`, or the ISA level
that isa.py caps them at; a few seconds), cached per source, flags and CPU model in
~/.cache/shoal/kernels, and loaded through ctypes, which releases the GIL during a call. Its OpenMP runtime is the one torch already loaded, so the kernels
share torch's threads. SHOAL_CPU_KERNELS=0 switches all of them off; callers then keep torch's code.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from shoal.backends.cpu import isa

log = logging.getLogger(__name__)

ALL_KERNELS_SWITCH = "SHOAL_CPU_KERNELS"
# -ffp-contract=off: scalar code rounds a multiply and an add separately, as torch's operators do.
# The -march / -m flags come from the ISA level (isa.py): -march=native unless capped.
FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC", "-std=c11"]


def switched_off(*names: str) -> bool:
    """Whether any of these environment switches (and always SHOAL_CPU_KERNELS) says 0 / false / no / off."""
    return any(
        os.environ.get(name, "1").strip().lower() in ("0", "false", "no", "off") for name in (ALL_KERNELS_SWITCH, *names)
    )


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "shoal" / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the same cache entry must not be reused on another CPU model."""
    info = isa.cpuinfo()
    keep = [f"{key}: {info[key]}" for key in ("model name", "flags", "features") if key in info]
    return "\n".join(keep) if keep else platform.processor() + platform.machine()


def tuning_flags() -> list[str]:
    """Constants tuned per CPU vendor (they move no result, only speed). gemv.c's PREFETCH (bytes ahead in
    the weight stream) is 4096 unless set here: on an AMX Xeon (KVM, 2 cores, 2026-12-02) 16384 read int8
    weights 11% faster in the kernel alone (26.2 against 23.5 GB/s, 586 MiB, medians of 4, ad hoc) and
    decoded the 0.5B Llama's int8 8% and int4 4% faster, bf16 alike (`compare_cpu.py --models llama
    --no-llama-cpp --rounds 2`, three runs a setting, alternated: 52.1 / 77.5 / 30.6 against 48.2 / 74.5 /
    30.6 tok/s). The AMD EPYCs tried keep 4096 (their int8 kernel read 0.96 of the memory's rate)."""
    return ["-DPREFETCH=16384"] if isa.cpuinfo().get("vendor_id") == "GenuineIntel" else []


def _build(sources: tuple[Path, ...], compiler: str, level: str) -> Path:
    folders = {source.parent for source in sources} | {source.parent.parent for source in sources}
    headers = sorted({h for folder in folders for h in folder.glob("*.h")})  # what the sources include
    flags = [*FLAGS, *isa.compiler_flags(level), *tuning_flags()]
    key = hashlib.sha256(
        b"".join(path.read_bytes() for path in (*sources, *headers))
        + " ".join([compiler, *flags]).encode() + _cpu_signature().encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"shoal_cpu-{level}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: several processes (tensor-parallel ranks) may race here.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run(
            [compiler, *flags, "-o", str(built), *map(str, sources), "-lm"], capture_output=True, text=True, timeout=120
        )
        if result.returncode != 0:
            names = ", ".join(source.name for source in sources)
            raise RuntimeError(f"{compiler} failed on {names}: {result.stderr.strip()[-2000:]}")
        os.replace(built, target)
    return target


def load(source: Path | tuple[Path, ...], what: str) -> ctypes.CDLL | None:
    """The compiled `source` (one C file, or several linked into one library), or None where it cannot
    be built here (the reason is logged once).

    `what` names the kernels in that message, e.g. "matrix-vector kernels"."""
    sources = (source,) if isinstance(source, Path) else tuple(source)
    if platform.system() != "Linux":
        return None  # -fopenmp against torch's bundled runtime is only arranged for Linux builds
    compiler = _compiler()
    if compiler is None:
        log.info("no C compiler found: the CPU backend keeps torch's operators instead of shoal's %s", what)
        return None
    try:
        torch.get_num_threads()  # make sure torch (and its OpenMP runtime) is loaded before ours binds to it
        return ctypes.CDLL(str(_build(sources, compiler, isa.chosen())))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning("shoal's CPU %s could not be built (%s); using torch's operators instead", what, exc)
        return None
