"""The registry: auto-selection, names with indices, and errors that say what to do."""

from __future__ import annotations

import pytest
import torch

from shoal.backends import Backend, MemoryInfo, available_backends, get_backend, list_backends, parse_device
from shoal.backends import register_backend, unregister_backend
from shoal.backends.cpu import CpuBackend
from shoal.errors import DeviceError


class GhostBackend(Backend):
    """Known but never present, so the 'not present' path is tested on every machine."""

    name = "ghostchip"
    device_type = "cpu"
    priority = 1000  # would win auto-selection if the registry ignored availability

    def is_available(self) -> bool:
        return False

    def absence_reason(self) -> str:
        return "the ghost driver is not loaded; run ghost-setup"

    def memory_info(self, index: int = 0) -> MemoryInfo:
        raise AssertionError("never asked of an absent backend")


@pytest.fixture
def ghost():
    backend = register_backend(GhostBackend)
    yield backend
    unregister_backend("ghostchip")


def test_builtins_are_known_and_cpu_is_available():
    names = [b.name for b in list_backends()]
    assert {"cpu", "cuda", "npu", "xpu", "mps"} <= set(names)
    priorities = [b.priority for b in list_backends()]
    assert priorities == sorted(priorities, reverse=True)
    assert "cpu" in [b.name for b in available_backends()]


def test_auto_picks_cpu_on_this_machine():
    if any(b.name != "cpu" for b in available_backends()):
        pytest.skip("an accelerator is present; auto would rightly pick it")
    assert get_backend().name == "cpu"
    assert get_backend("auto") is get_backend()
    assert parse_device(None) == (get_backend("cpu"), 0)


def test_auto_skips_unavailable_backends_whatever_their_priority(ghost):
    assert get_backend().name != "ghostchip"


def test_get_backend_by_name_and_index():
    cpu = get_backend("cpu")
    assert isinstance(cpu, CpuBackend)
    assert get_backend("CPU") is cpu
    assert parse_device("cpu:0") == (cpu, 0)
    assert parse_device(torch.device("cpu")) == (cpu, 0)


def test_unknown_name_lists_the_known_backends():
    with pytest.raises(DeviceError) as caught:
        get_backend("tpu9000")
    message = str(caught.value)
    assert "unknown device 'tpu9000'" in message
    for name in ("cpu", "cuda", "npu", "xpu", "mps"):
        assert name in message


def test_unavailable_backend_says_why_and_what_is_available(ghost):
    with pytest.raises(DeviceError) as caught:
        get_backend("ghostchip:0")
    message = str(caught.value)
    assert "'ghostchip' is not present" in message
    assert "run ghost-setup" in message
    assert "cpu" in message.split("Available here:")[1]


def test_absent_builtin_explains_itself():
    if torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    with pytest.raises(DeviceError, match="'cuda' is not present here: .*install"):
        get_backend("cuda")


def test_index_past_the_visible_devices_and_malformed_specs():
    with pytest.raises(DeviceError, match=r"only 1 cpu device.*'cpu:0'"):
        parse_device("cpu:3")
    with pytest.raises(DeviceError, match="NAME:INDEX"):
        parse_device("cpu:first")


def test_register_backend_rejects_names_that_cannot_be_typed():
    class Bad(GhostBackend):
        name = "Bad:Name"

    with pytest.raises(ValueError, match="lowercase"):
        register_backend(Bad)
    with pytest.raises(TypeError):
        register_backend(object())  # type: ignore[arg-type]


def test_lazy_npu_import_survives_a_broken_torch_npu(tmp_path, monkeypatch):
    # A half-installed CANN makes `import torch_npu` raise something other than ImportError.
    from shoal.backends import npu

    (tmp_path / "torch_npu.py").write_text("raise RuntimeError('libascendcl.so: cannot open shared object')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "torch_npu", raising=False)
    monkeypatch.setattr(npu, "_torch_npu", None)
    monkeypatch.setattr(npu, "_import_error", None)
    backend = npu.NpuBackend()
    assert backend.is_available() is False
    assert "libascendcl" in backend.absence_reason() and "CANN" in backend.absence_reason()
    assert get_backend().name != "npu"
