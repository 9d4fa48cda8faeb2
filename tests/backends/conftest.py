"""Fixtures for the backend tests."""

from fake_backend import fake_backend  # noqa: F401  (re-exported as a fixture)

import pytest


@pytest.fixture
def cpu_ops_bound(monkeypatch):
    """Layers built outside a model (plain RMSNorm, Linear, LMHead, ...) call the CPU backend's ops, as a
    loaded model's layers do once bind_ops has run."""
    from shoal.backends.cpu.ops import CpuOps
    from shoal.layers.embedding import LMHead
    from shoal.layers.linear import Linear
    from shoal.layers.mlp import GatedMLP
    from shoal.layers.moe import Router, StackedExperts
    from shoal.layers.norm import RMSNorm

    ops = CpuOps()
    for cls in (RMSNorm, Linear, LMHead, GatedMLP, Router, StackedExperts):
        monkeypatch.setattr(cls, "ops", ops)
    return ops
