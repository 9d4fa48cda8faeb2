"""A device extension that fails to load (here a fake torch_npu that, like the real one without the CANN
toolkit, dies on libhccl.so) breaks `import torch` itself; shoal keeps working on the CPU and
`shoal doctor` names what is missing and how to fix it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

FAKE_TORCH_NPU = '''
raise ImportError("libhccl.so: cannot open shared object file: No such file or directory")

def _autoload():
    pass
'''


@pytest.fixture(scope="module")
def broken_env(tmp_path_factory):
    """An environment whose Python finds a torch_npu package (and its torch.backends entry point) that fails."""
    site = tmp_path_factory.mktemp("site")
    (site / "torch_npu").mkdir()
    (site / "torch_npu" / "__init__.py").write_text(FAKE_TORCH_NPU)
    info = site / "torch_npu-2.13.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch_npu\nVersion: 2.13.0\n")
    (info / "entry_points.txt").write_text("[torch.backends]\ntorch_npu = torch_npu:_autoload\n")
    (info / "RECORD").write_text("")
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": path}
    env.pop("TORCH_DEVICE_BACKEND_AUTOLOAD", None)
    return env


def run(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)


def test_the_fake_extension_breaks_torch_as_torch_npu_does(broken_env):
    result = run(broken_env, "-c", "import torch")
    assert result.returncode != 0 and "Failed to load the backend extension: torch_npu" in result.stderr


def test_shoal_runs_on_the_cpu_and_doctor_names_the_missing_cann_toolkit(broken_env, checkpoint):
    path, _ = checkpoint("llama")
    result = run(broken_env, "-m", "shoal.cli", "generate", "hello", "--model", str(path), "--max-tokens", "3",
                 "--temperature", "0", "--json")
    assert result.returncode == 0, result.stderr
    result = run(broken_env, "-m", "shoal.cli", "doctor", "--quick")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "torch_npu is installed but fails to load (libhccl.so" in out
    assert "CANN toolkit" in out and "set_env.sh" in out
    assert "torch_npu (torch_npu:_autoload): ImportError: libhccl.so" in out
    assert "measured on cpu" in out
    # The user's own choice is left alone: with autoloading off, torch imports and so does shoal.
    result = run({**broken_env, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}, "-m", "shoal.cli", "doctor", "--quick")
    assert result.returncode == 0 and "CANN toolkit" in result.stdout
