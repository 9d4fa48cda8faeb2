"""A third-party backend installed the way a plugin package is — a module plus a dist-info that
declares it under the `shoal.backends` entry-point group — so tests can prove plugins work.

`fake_backend` is a pytest fixture: it installs "fakechip" (computes on the CPU, counts every
attention and linear call, and brings its own RMSNorm, SiLU-and-multiply and argmax ops, written
another way than shoal's reference and counted too) into a temp dir on sys.path, and yields the
registered instance.
Reuse it elsewhere with `from tests.backends.fake_backend import fake_backend` in a conftest.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Iterator

import pytest

from shoal.backends import Backend, get_backend, reload_entry_points, unregister_backend

FAKE_MODULE_NAME = "fakechip_mod"

FAKE_MODULE_SOURCE = textwrap.dedent('''
    """fakechip: a pretend accelerator that computes on the CPU and counts how often it is used."""
    import torch

    from shoal.backends.base import Backend, MemoryInfo, sdpa_attention
    from shoal.backends.ops import Ops


    class FakeChipOps(Ops):
        """A chip's own operations, as a plugin brings them: computed another way than the reference."""

        name = "fakechip"

        def __init__(self, calls):
            self.calls = calls  # op name -> times called, shared with the backend

        def rms_norm(self, x, weight, eps, residual=None):
            self.calls["rms_norm"] = self.calls.get("rms_norm", 0) + 1
            summed = x if residual is None else x + residual
            x32 = summed.float()
            normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
            out = weight * normed.to(summed.dtype)
            return out if residual is None else (out, summed)

        def silu_mul(self, gate_up):
            self.calls["silu_mul"] = self.calls.get("silu_mul", 0) + 1
            inter = gate_up.shape[-1] // 2
            gate, up = gate_up[..., :inter], gate_up[..., inter:]
            return gate * torch.sigmoid(gate) * up

        def argmax(self, scores):
            self.calls["argmax"] = self.calls.get("argmax", 0) + 1
            return torch.argmax(scores, dim=-1)


    class FakeChipBackend(Backend):
        name = "fakechip"
        device_type = "cpu"
        dist_backend = "gloo"
        visible_devices_env = "FAKECHIP_VISIBLE_DEVICES"
        priority = 0  # chosen only by name, so it never takes --device auto from the real cpu backend
        total_bytes = 4 << 30  # a small chip: an engine sizing its KV cache from this stays modest

        def __init__(self):
            self.attention_calls = 0  # calls of the functions attention_fn() returned
            self.linear_calls = 0  # calls of the functions linear_fn() returned
            self.synchronize_calls = 0
            self.op_calls = {}  # calls of FakeChipOps' operations, by name

        def is_available(self):
            return True

        def device_name(self, index=0):
            return f"FakeChip {index}"

        def memory_info(self, index=0):
            return MemoryInfo(free_bytes=self.total_bytes // 2, total_bytes=self.total_bytes)

        def synchronize(self):
            self.synchronize_calls += 1

        def attention_fn(self, *, mla, kv_dtype):
            def attention(q, k, v, mask, scale):
                self.attention_calls += 1
                return sdpa_attention(q, k, v, mask, scale)
            return attention

        def ops(self, kernels="auto"):
            return FakeChipOps(self.op_calls)

        def linear_fn(self, weight_format):
            dense = super().linear_fn(weight_format)
            def linear(*args, **kwargs):
                self.linear_calls += 1
                return dense(*args, **kwargs)
            return linear


    def make_backend():
        """A factory entry point: a zero-argument callable returning a Backend."""
        backend = FakeChipBackend()
        backend.name = "fakechip-factory"
        return backend
''')


def write_plugin(directory: Path, entry_points: dict[str, str], dist_name: str = "fakechip") -> None:
    """Write the fakechip module and a `<dist_name>-0.1.dist-info` declaring `entry_points`
    (entry-point name -> "module:attribute") under [shoal.backends] into `directory`."""
    (directory / f"{FAKE_MODULE_NAME}.py").write_text(FAKE_MODULE_SOURCE)
    dist_info = directory / f"{dist_name}-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (dist_info / "entry_points.txt").write_text(f"[shoal.backends]\n{lines}")


def forget_plugin(*names: str) -> None:
    """Undo a plugin install: drop its backends and its imported module."""
    for name in names:
        unregister_backend(name)
    sys.modules.pop(FAKE_MODULE_NAME, None)


@pytest.fixture
def fake_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    """The "fakechip" backend, found through its entry point; its counters start at zero."""
    plugin_dir = tmp_path / "fakechip_plugin"
    plugin_dir.mkdir()
    write_plugin(plugin_dir, {"fakechip": f"{FAKE_MODULE_NAME}:FakeChipBackend"})
    monkeypatch.syspath_prepend(str(plugin_dir))  # also invalidates import and metadata caches
    reload_entry_points()
    yield get_backend("fakechip")
    forget_plugin("fakechip")
