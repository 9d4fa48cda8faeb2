"""Helpers shared by the quantization tests."""

from __future__ import annotations

import pytest
import torch

from shoal.backends import get_backend
from shoal.loader import build_model

IDS = torch.arange(2, 18)[None]


def run_logits(path, dtype=torch.float32, backend=None, **options) -> torch.Tensor:
    """Float32 logits of 16 fixed tokens through a model loaded from `path` with loader `options`."""
    model, _, _ = build_model(path, backend or get_backend("cpu"), torch.device("cpu"), dtype, progress=False, **options)
    cache = model.make_cache(1, 16, dtype, "cpu")
    with torch.no_grad():
        return model.compute_logits(model(IDS, torch.arange(16)[None], cache))[0]


@pytest.fixture
def logits():
    return run_logits
