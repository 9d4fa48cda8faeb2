"""Third-party backends arrive through the `shoal.backends` entry-point group."""

from __future__ import annotations

import pytest
import torch

from fake_backend import FAKE_MODULE_NAME, forget_plugin, write_plugin
from shoal.backends import get_backend, list_backends, parse_device, reload_entry_points
from shoal.backends.base import sdpa_attention


@pytest.fixture
def plugin_dir(tmp_path):
    yield tmp_path
    forget_plugin("fakechip", "fakechip-factory")


def test_unknown_name_triggers_a_rescan_that_finds_a_new_plugin(plugin_dir, monkeypatch):
    list_backends()  # the registry has scanned before the plugin exists
    write_plugin(plugin_dir, {"fakechip": f"{FAKE_MODULE_NAME}:FakeChipBackend"})
    monkeypatch.syspath_prepend(str(plugin_dir))
    backend = get_backend("fakechip")
    assert type(backend).__name__ == "FakeChipBackend"
    assert backend.device_type == "cpu"
    assert "fakechip" in [b.name for b in list_backends()]
    assert parse_device("fakechip:0") == (backend, 0)
    assert get_backend().name != "fakechip"  # priority 0: only ever chosen by name


def test_factory_entry_point(plugin_dir, monkeypatch):
    write_plugin(plugin_dir, {"fakechip-factory": f"{FAKE_MODULE_NAME}:make_backend"})
    monkeypatch.syspath_prepend(str(plugin_dir))
    reload_entry_points()
    assert get_backend("fakechip-factory").device_name() == "FakeChip 0"


def test_broken_plugin_warns_and_shoal_keeps_working(plugin_dir, monkeypatch):
    write_plugin(plugin_dir, {
        "missing": "no_such_module_anywhere:Backend",
        "notabackend": f"{FAKE_MODULE_NAME}:torch",
        "fakechip": f"{FAKE_MODULE_NAME}:FakeChipBackend",
    })
    monkeypatch.syspath_prepend(str(plugin_dir))
    with pytest.warns(RuntimeWarning, match="skipping backend plugin") as caught:
        reload_entry_points()
    messages = " ".join(str(w.message) for w in caught)
    assert "plugin 'missing'" in messages and "plugin 'notabackend'" in messages
    assert "Fix or uninstall the package" in messages
    assert get_backend("cpu").name == "cpu"
    assert get_backend("fakechip").name == "fakechip"  # the good entry point in the same package still loads


def test_fake_backend_counts_its_use(fake_backend):
    assert fake_backend.name == "fakechip" and fake_backend.attention_calls == 0
    q, k, v = (torch.randn(1, 2, 3, 8) for _ in range(3))
    attention = fake_backend.attention_fn(mla=False, kv_dtype=torch.float32)
    torch.testing.assert_close(attention(q, k, v, None, 0.35), sdpa_attention(q, k, v, None, 0.35))
    linear = fake_backend.linear_fn("dense")
    linear(torch.randn(2, 4), torch.randn(3, 4))
    assert (fake_backend.attention_calls, fake_backend.linear_calls) == (1, 1)
    assert fake_backend.torch_device(0) == torch.device("cpu")
    assert fake_backend.memory_info().total_bytes == 4 << 30
