"""measure_device and the doctor report on this machine (quick mode only: behaviour, not speed)."""

from __future__ import annotations

import json

import pytest
import torch

from shoal.backends import get_backend
from shoal.backends.doctor import doctor_report, format_doctor_report
from shoal.backends.measure import measure_device
from shoal.errors import DeviceError


def test_quick_measure_returns_positive_figures():
    profile = measure_device(get_backend("cpu"), quick=True)
    assert profile.memory_bandwidth_gbps > 0.1
    assert set(profile.matmul_tflops) == {"float32", "bfloat16"}
    assert all(tflops > 0 for tflops in profile.matmul_tflops.values())


@pytest.fixture(scope="module")
def report():
    return doctor_report(device="cpu", quick=True)


def test_report_is_json_and_covers_every_backend(report):
    assert json.loads(json.dumps(report)) == report
    by_name = {entry["name"]: entry for entry in report["backends"]}
    assert {"cpu", "cuda", "npu", "xpu", "mps"} <= set(by_name)
    cpu = by_name["cpu"]
    assert cpu["available"] and cpu["device_count"] == 1
    assert {"float32", "bfloat16"} <= set(cpu["dtypes"])
    assert isinstance(cpu["bf16_native"], bool) and cpu["dist_backend"] == "gloo"
    assert cpu["devices"][0]["memory_total_bytes"] >= cpu["devices"][0]["memory_free_bytes"] > 0
    for entry in report["backends"]:
        assert entry["available"] or entry["absence_reason"]
    assert report["selected"]["backend"] == "cpu"
    assert report["throughput"]["memory_bandwidth_gbps"] > 0
    assert report["threads"] >= 1


def test_format_shows_table_devices_and_figures(report):
    text = format_doctor_report(report)
    assert "backend" in text and "present" in text
    assert "cpu:0" in text and "GiB free" in text
    assert "memory bandwidth" in text and "GB/s" in text and "TFLOP/s" in text
    for entry in report["backends"]:
        if not entry["available"]:
            assert entry["absence_reason"] in text


def test_format_survives_a_backend_that_errors(report):
    broken = json.loads(json.dumps(report))
    broken["backends"].append({**broken["backends"][-1], "name": "flaky", "error": "RuntimeError: driver hung"})
    broken["backends"][-1]["available"] = True
    assert "flaky: error: RuntimeError: driver hung" in format_doctor_report(broken)


def test_bad_device_raises_before_measuring():
    with pytest.raises(DeviceError, match="unknown device"):
        doctor_report(device="nosuchchip", quick=True)


KERNELS = ["bf16 matvec", "int8 matvec", "int4 matvec", "batched rows (int4, 16 rows)", "MoE experts (int4, 2 routed)"]


def _check_kernel_figures(figures: list[dict]) -> None:
    assert [f["kernel"] for f in figures] == KERNELS
    for f in figures:
        assert f["path"] and f["weight_bytes"] > 1 << 20 and f["read_gbps"] > 0
        if f["gbps"] is None:  # not measured: the path says why
            assert f["path"].startswith("not measured: ") and f["share"] is None
        else:
            assert f["gbps"] > 0 and f["share"] == pytest.approx(f["gbps"] / f["read_gbps"])


def test_doctor_shows_each_decode_kernels_path_and_share_of_the_bandwidth(report):
    """The shape of the per-kernel table (the figures themselves are the machine's)."""
    _check_kernel_figures(report["kernels"])
    text = format_doctor_report(report)
    assert "decode kernels on cpu" in text and "share of read bandwidth" in text
    for f in report["kernels"]:
        row = next(line for line in text.splitlines() if line.strip().startswith(f["kernel"]))
        assert f["path"] in row and (f["gbps"] is None) == row.rstrip().endswith("-")


def test_kernel_figures_name_shoals_isa_path_where_its_kernels_are_chosen(monkeypatch):
    from shoal.backends.cpu import gemv, isa

    if not gemv.available():
        pytest.skip("no C compiler here: the kernels are not built")
    monkeypatch.setattr(gemv, "vectorized", lambda: True)  # "auto" takes shoal's kernels, as on AVX-512 / NEON
    figures = get_backend("cpu").kernel_figures(quick=True)
    _check_kernel_figures(figures)
    for f in figures[:3]:
        assert f["path"].startswith(f"shoal {isa.chosen()}: ") and f["gbps"] > 0
    assert figures[4]["path"].endswith(", one call") and figures[4]["gbps"] > 0
    assert figures[3]["path"].startswith("shoal" if gemv.rows_kernels_available() else "not measured")


def test_the_stream_read_reads_every_byte():
    """shoal_stream_read, the kernels' reference in doctor, returns the xor of every 64-bit word it read."""
    import ctypes

    import numpy as np

    from shoal.backends.cpu import gemv
    from shoal.backends.cpu.library import kernels

    if not gemv.available():
        pytest.skip("no C compiler here: the kernels are not built")
    data = torch.randint(0, 256, (3 << 20,), dtype=torch.uint8)
    out = ctypes.c_uint64()
    assert kernels().shoal_stream_read(data.data_ptr(), data.numel(), ctypes.byref(out), 2) == 0
    assert out.value == int(np.bitwise_xor.reduce(data.numpy().view(np.uint64)))
    assert kernels().shoal_stream_read(data.data_ptr(), 100, ctypes.byref(out), 2) == 1  # not whole 256-byte steps


def test_kernel_weights_outgrow_the_last_level_cache(monkeypatch):
    """64 MiB a matrix, or twice the largest cache where that is more (a VM's 480 MiB of L3 held the 64 MiB),
    within 1 GiB and a 32nd of the available memory."""
    from shoal.backends.cpu import kernel_figures

    monkeypatch.setattr(kernel_figures.os, "sysconf", lambda name: {"SC_AVPHYS_PAGES": 8 << 20, "SC_PAGE_SIZE": 4096}[name])
    for cache, expected in ((32 << 20, 64 << 20), (480 << 20, 960 << 20), (4 << 30, 1 << 30)):
        monkeypatch.setattr(kernel_figures, "last_level_cache_bytes", lambda cache=cache: cache)
        assert kernel_figures.measured_bytes(quick=False) == expected
    monkeypatch.setattr(kernel_figures.os, "sysconf", lambda name: {"SC_AVPHYS_PAGES": 1 << 20, "SC_PAGE_SIZE": 4096}[name])
    assert kernel_figures.measured_bytes(quick=False) == 128 << 20  # 4 GiB available
    assert kernel_figures.measured_bytes(quick=True) == 4 << 20
    assert kernel_figures.last_level_cache_bytes() >= 0
