"""`shoal doctor`: what every known backend finds on this machine, and what the chosen device measures.

doctor_report() returns plain JSON-serialisable data (the CLI's --json prints it as is);
format_doctor_report() renders it as a table for people.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from shoal.backends.base import Backend
from shoal.backends.registry import list_backends, parse_device

_GIB = 1 << 30


def _dtype_names(dtypes: list[torch.dtype]) -> list[str]:
    return [str(dtype).removeprefix("torch.") for dtype in dtypes]


def _describe(backend: Backend) -> dict[str, Any]:
    """One backend's row. A backend that is present but fails a query gets an "error" instead of
    crashing the report: a broken driver is exactly what doctor exists to show."""
    entry: dict[str, Any] = {
        "name": backend.name,
        "device_type": backend.device_type,
        "priority": backend.priority,
        "dist_backend": backend.dist_backend,
        "visible_devices_env": backend.visible_devices_env,
    }
    try:
        available = bool(backend.is_available())
    except Exception as exc:
        return {**entry, "available": False, "absence_reason": f"availability check failed: {exc!r}"}
    entry["available"] = available
    if not available:
        try:
            entry["absence_reason"] = backend.absence_reason()
        except Exception as exc:
            entry["absence_reason"] = repr(exc)
        return entry
    try:
        env = backend.visible_devices_env
        supported = backend.supported_dtypes()
        native = backend.native_dtypes()
        count = backend.device_count()
        devices = []
        for index in range(count):
            memory = backend.memory_info(index)
            devices.append({
                "index": index,
                "name": backend.device_name(index),
                "memory_free_bytes": memory.free_bytes,
                "memory_total_bytes": memory.total_bytes,
            })
        entry.update({
            "visible_devices": os.environ.get(env) if env else None,
            "device_count": count,
            "devices": devices,
            "dtypes": _dtype_names(supported),
            "native_dtypes": _dtype_names(native),
            "bf16_native": torch.bfloat16 in native,
            "fp8_matmul": bool(backend.supports_fp8_matmul()),
            "quantized_kernels": list(backend.quantized_matmul_kernels()),
            "extra": {str(k): str(v) for k, v in backend.extra_info().items()},
        })
    except Exception as exc:
        entry["error"] = f"{type(exc).__name__}: {exc}"
    return entry


def doctor_report(device: str | None = None, quick: bool = False) -> dict[str, Any]:
    """Every known backend with what it finds here, then the measured throughput of `device`
    ("auto"/None = the one shoal would pick). Raises DeviceError if `device` cannot be used."""
    backend, index = parse_device(device)  # first, so a bad --device fails before any slow work
    profile = backend.measure_throughput(index=index, quick=quick)
    from shoal.torch_extensions import failed_extensions

    return {
        "torch_version": torch.__version__,
        "failed_extensions": [{"name": f.name, "target": f.target, "error": f.error} for f in failed_extensions],
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "backends": [_describe(b) for b in list_backends()],
        "selected": {
            "backend": backend.name,
            "index": index,
            "device": str(backend.torch_device(index)),
            "name": backend.device_name(index),
        },
        "throughput": {
            "quick": quick,
            "memory_bandwidth_gbps": profile.memory_bandwidth_gbps,
            "matmul_tflops": dict(profile.matmul_tflops),
            "link_bandwidth_gbps": profile.link_bandwidth_gbps,
        },
        "kernels": backend.kernel_figures(quick=quick),
    }


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def _kernel_rows(figures: list[dict[str, Any]]) -> list[list[str]]:
    """Backend.kernel_figures as table rows; "-" where a kernel was not measured."""
    rows = [["kernel", "path here", "weights", "GB/s", "share of read bandwidth"]]
    for f in figures:
        measured = f["gbps"] is not None
        rows.append([f["kernel"], f["path"], f"{f['weight_bytes'] / (1 << 20):.0f} MiB",
                     f"{f['gbps']:.1f}" if measured else "-", f"{f['share']:.2f}" if measured else "-"])
    return rows


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def format_doctor_report(report: dict[str, Any]) -> str:
    """The report as plain text: a backend table, the devices found, and the measured figures."""
    lines = [
        f"shoal doctor — torch {report['torch_version']}, python {report['python_version']}, "
        f"{report['threads']} threads",
        f"platform: {report['platform']}",
        "",
    ]
    rows = [["backend", "present", "devices", "dist", "dtypes (* = native)", "fp8 mm", "quant kernels"]]
    for entry in report["backends"]:
        if not entry["available"]:
            rows.append([entry["name"], "no", "-", entry["dist_backend"], "-", "-", "-"])
        elif "error" in entry:
            rows.append([entry["name"], "yes", "?", entry["dist_backend"], "error", "-", "-"])
        else:
            dtypes = ",".join(d + ("*" if d in entry["native_dtypes"] else "") for d in entry["dtypes"])
            rows.append([
                entry["name"], "yes", str(entry["device_count"]), entry["dist_backend"], dtypes,
                _yes(entry["fp8_matmul"]), ",".join(entry["quantized_kernels"]) or "-",
            ])
    lines += _table(rows)

    lines += ["", "devices:"]
    for entry in report["backends"]:
        if not entry["available"]:
            continue
        if "error" in entry:
            lines.append(f"  {entry['name']}: error: {entry['error']}")
            continue
        for dev in entry["devices"]:
            free, total = dev["memory_free_bytes"] / _GIB, dev["memory_total_bytes"] / _GIB
            where = f"{entry['name']}:{dev['index']}"
            lines.append(f"  {where}  {dev['name']}  memory {free:.1f} GiB free of {total:.1f} GiB")
        facts = dict(entry["extra"])
        facts["bf16 native"] = _yes(entry["bf16_native"])
        if entry["visible_devices_env"]:
            visible = entry["visible_devices"]
            facts[entry["visible_devices_env"]] = "(unset)" if visible is None else visible
        lines.append("    " + ", ".join(f"{k}: {v}" for k, v in facts.items()))

    absent = [entry for entry in report["backends"] if not entry["available"]]
    if absent:
        lines += ["", "not present:"]
        lines += [f"  {entry['name']}: {entry['absence_reason']}" for entry in absent]

    if report.get("failed_extensions"):
        lines += ["", "torch device extensions that failed to load (shoal runs without them):"]
        lines += [f"  {f['name']} ({f['target']}): {f['error']}" for f in report["failed_extensions"]]

    selected, throughput = report["selected"], report["throughput"]
    lines += ["", f"measured on {selected['backend']}:{selected['index']} ({selected['name']})"
              + (" — quick, rough figures" if throughput["quick"] else "") + ":"]
    rows = [["memory bandwidth", f"{throughput['memory_bandwidth_gbps']:.1f} GB/s"]]
    rows += [[f"matmul {dtype}", f"{tflops:.3f} TFLOP/s"] for dtype, tflops in throughput["matmul_tflops"].items()]
    if throughput["link_bandwidth_gbps"] is not None:
        rows.append(["link bandwidth", f"{throughput['link_bandwidth_gbps']:.1f} GB/s"])
    lines += ["  " + line for line in _table(rows)]
    if report.get("kernels"):
        read = report["kernels"][0]["read_gbps"]
        lines += ["", f"decode kernels on {selected['backend']} (weight bytes read per second, against a stream read "
                      f"of as many bytes: {read:.1f} GB/s):"]
        lines += ["  " + line for line in _table(_kernel_rows(report["kernels"]))]
    return "\n".join(lines)
