"""Shared fixtures: tiny random checkpoints built once per test session with transformers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import build_checkpoint  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(name) -> (folder, transformers model); each architecture is built once per session."""
    built: dict[str, tuple[Path, object]] = {}

    def get(name: str):
        if name not in built:
            path = tmp_path_factory.mktemp(name)
            built[name] = (path, build_checkpoint(name, path))
        return built[name]

    return get
