"""Imports torch so that a broken device extension cannot break shoal.

torch loads every installed device extension (entry points in the `torch.backends` group: torch_npu,
...) inside `import torch`, and one that fails — torch_npu installed from PyPI without the CANN
toolkit, the usual state before `source .../ascend-toolkit/set_env.sh` — makes `import torch` itself
raise, so every shoal command, `doctor` included, would die. shoal/__init__.py calls `import_torch()`
first: it imports torch with autoloading off, then loads each extension itself and remembers which
failed and why (`failed_extensions`, which `shoal doctor` lists). The backend of a failed extension
reports itself absent; the CPU and every other backend work as before.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

_AUTOLOAD = "TORCH_DEVICE_BACKEND_AUTOLOAD"
_GROUP = "torch.backends"


@dataclass(frozen=True)
class FailedExtension:
    name: str  # the entry point's name (torch_npu, ...)
    target: str  # what it loads, module:function
    error: str  # the exception, as one line


failed_extensions: list[FailedExtension] = []


def import_torch() -> None:
    """Import torch, then its device extensions one by one; a failing one is recorded, never raised.
    Does nothing special when torch is already imported or the user set TORCH_DEVICE_BACKEND_AUTOLOAD."""
    if "torch" in sys.modules or _AUTOLOAD in os.environ:
        import torch  # noqa: F401

        return
    os.environ[_AUTOLOAD] = "0"
    try:
        import torch  # noqa: F401
    finally:
        del os.environ[_AUTOLOAD]  # children (workers, other programs) choose for themselves again
    from importlib.metadata import entry_points

    for extension in entry_points(group=_GROUP):
        try:
            extension.load()()
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            failed_extensions.append(FailedExtension(extension.name, extension.value, error))
