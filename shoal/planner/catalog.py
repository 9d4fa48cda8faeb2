"""The hardware catalog: chips as data (catalog.toml, plus the user's own files), and "this machine" as measured.

Each figure carries its kind ("official" or "estimate") and a source string; a chip missing a
required figure, or a figure without a source, is refused when the catalog loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from shoal.planner.errors import PlanError

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

BUILTIN_CATALOG = Path(__file__).with_name("catalog.toml")
REQUIRED = ("bf16_tflops", "memory_gb", "memory_bw_gbps", "scaleup_gbps", "scaleup_domain", "scaleout_gbps", "power_w")
OPTIONAL = ("fp8_tflops", "int8_tops", "fp4_tflops", "system_power_w", "price_per_hour", "ep_dispatch_latency_us",
            "ep_combine_latency_us")
KINDS = ("official", "estimate", "measured")
THIS_MACHINE = "this"


@dataclass
class Chip:
    """One accelerator (or CPU socket) as the cost model sees it."""

    key: str
    name: str
    bf16_tflops: float
    memory_gb: float
    memory_bw_gbps: float
    scaleup_gbps: float
    scaleup_domain: int
    scaleout_gbps: float
    power_w: float
    fp8_tflops: float | None = None
    int8_tops: float | None = None
    fp4_tflops: float | None = None
    system_power_w: float | None = None
    price_per_hour: float | None = None
    # Fixed latency of one expert-parallel dispatch and one combine (the stack's kernels: their launch,
    # the signalling round trip between all ranks), paid however few tokens move; the bytes then move at
    # the link's rate. Derived from a published kernel time at a known message size (that time minus its
    # bytes over the link); unset: the fabric's start-up latency alone (cost.SCALEUP/SCALEOUT_LATENCY_S).
    ep_dispatch_latency_us: float | None = None
    ep_combine_latency_us: float | None = None
    family: str = "other"  # software stack (nvidia, ascend, cpu, ...): chips of one family share fitted factors
    sources: dict[str, tuple[str, str]] = field(default_factory=dict)  # figure -> (kind, source)
    efficiency: dict[str, float] = field(default_factory=dict)  # calibrated factors for this chip, if any

    def matmul_tflops(self, compute: str) -> float:
        """Peak dense TFLOP/s for matmuls in `compute` ("bf16", "fp8", "int8"); falls back to bf16
        when the chip has no unit for that format (the weights are then dequantized on the fly)."""
        if compute == "fp8" and self.fp8_tflops:
            return self.fp8_tflops
        if compute == "int8" and self.int8_tops:
            return self.int8_tops
        if compute == "fp4" and self.fp4_tflops:
            return self.fp4_tflops
        return self.bf16_tflops

    def has_compute(self, compute: str) -> bool:
        return compute == "bf16" or (compute == "fp8" and bool(self.fp8_tflops)) or (
            compute == "int8" and bool(self.int8_tops)) or (compute == "fp4" and bool(self.fp4_tflops))

    @property
    def energy_power_w(self) -> float:
        """Watts charged per chip for energy per token: its share of the whole system when known."""
        return self.system_power_w or self.power_w


def _parse_chip(key: str, entry: dict, origin: str) -> Chip:
    if not isinstance(entry, dict):
        raise PlanError(f"{origin}: chips.{key} must be a table")
    values: dict[str, float] = {}
    sources: dict[str, tuple[str, str]] = {}
    for name in REQUIRED + OPTIONAL:
        item = entry.get(name)
        if item is None:
            if name in REQUIRED:
                raise PlanError(f"{origin}: chips.{key} has no {name!r}; every chip needs {', '.join(REQUIRED)}")
            continue
        if not isinstance(item, dict) or "value" not in item:
            raise PlanError(f"{origin}: chips.{key}.{name} must be {{ value = ..., kind = \"official\"|\"estimate\", "
                            f"source = \"...\" }}")
        kind, source = item.get("kind"), item.get("source")
        if kind not in KINDS or not source:
            raise PlanError(f"{origin}: chips.{key}.{name} needs kind (official or estimate) and a source")
        try:
            values[name] = float(item["value"])
        except (TypeError, ValueError):
            raise PlanError(f"{origin}: chips.{key}.{name} value must be a number, got {item['value']!r}") from None
        if values[name] <= 0:
            raise PlanError(f"{origin}: chips.{key}.{name} must be positive, got {values[name]}")
        sources[name] = (kind, str(source))
    efficiency = {str(k): float(v) for k, v in (entry.get("efficiency") or {}).items()}
    return Chip(key=key, name=str(entry.get("name", key)), family=str(entry.get("family", "other")).lower(),
                sources=sources, efficiency=efficiency,
                scaleup_domain=int(values.pop("scaleup_domain")), **values)


def load_catalog(extra: list[str | Path] | None = None) -> dict[str, Chip]:
    """The built-in catalog, then each user file in order (a user entry replaces a built-in one of the same key)."""
    chips: dict[str, Chip] = {}
    for path in [BUILTIN_CATALOG, *(Path(p) for p in extra or [])]:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PlanError(f"no catalog file at {path}") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise PlanError(f"cannot read catalog {path}: {exc}") from None
        table = data.get("chips")
        if not isinstance(table, dict) or not table:
            raise PlanError(f"{path} has no [chips.NAME] tables")
        for key, entry in table.items():
            chips[key.lower()] = _parse_chip(key.lower(), entry, str(path))
    return chips


def native_format(device: str | None = "cpu") -> str:
    """The planner's weight format for the dtype shoal computes in on `device` (its `--dtype auto`):
    "bf16" where the device has bf16 arithmetic, "fp32" on a CPU without it (bf16 there is emulated)."""
    from shoal.backends.registry import parse_device

    backend, _ = parse_device(device)
    return DTYPE_FORMATS[str(backend.default_dtype()).removeprefix("torch.")]


DTYPE_FORMATS = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def this_machine(quick: bool = True, device: str | None = "cpu", calibration: dict | None = None) -> Chip:
    """"This machine" as `shoal doctor` measures it: the matmul peak in the dtype shoal computes in here
    (bf16, or float32 on a CPU without bf16 arithmetic: `bf16_tflops` is then float32's peak, the rate the
    engine's matmuls can reach), memory bandwidth measured here, memory from the backend, and the
    efficiency factors of a saved calibration when there is one."""
    from shoal.backends.registry import parse_device

    backend, index = parse_device(device)
    profile = backend.measure_throughput(index=index, quick=quick)
    memory = backend.memory_info(index)
    native = str(backend.default_dtype()).removeprefix("torch.")
    bf16 = profile.matmul_tflops.get(native) or profile.matmul_tflops["float32"]
    measured = ("measured", f"shoal doctor on {backend.device_name(index)}" + (" (quick)" if quick else "")
                + f", matmul peak in {native}")
    sources = {name: measured for name in ("bf16_tflops", "memory_bw_gbps", "memory_gb")}
    assumed = ("estimate", "no link measured: a single device")
    sources.update({name: assumed for name in ("scaleup_gbps", "scaleup_domain", "scaleout_gbps")})
    sources["power_w"] = ("estimate", "assumed 100 W: set your own in --catalog")
    return Chip(
        key=THIS_MACHINE, name=f"this machine ({backend.device_name(index)})", family=THIS_MACHINE, bf16_tflops=bf16,
        memory_gb=memory.total_bytes / 1e9, memory_bw_gbps=profile.memory_bandwidth_gbps,
        scaleup_gbps=profile.link_bandwidth_gbps or 10.0, scaleup_domain=1, scaleout_gbps=1.0, power_w=100.0,
        sources=sources, efficiency=dict((calibration or {}).get("factors", {})),
    )


def resolve_chips(names: str | list[str], catalog: dict[str, Chip], measure=this_machine) -> list[Chip]:
    """Chips named on the command line ("h200,910c"); "this" measures this machine."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise PlanError("no chips given; name at least one, e.g. --chips h200,910c")
    chips = []
    for name in names:
        key = name.lower()
        if key == THIS_MACHINE and key not in catalog:
            chips.append(measure())
        elif key in catalog:
            chips.append(catalog[key])
        else:
            known = ", ".join(sorted(catalog)) + f", {THIS_MACHINE}"
            raise PlanError(f"unknown chip {name!r}; the catalog has {known} (add your own with --catalog FILE)")
    return chips
