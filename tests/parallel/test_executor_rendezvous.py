"""Where the ranks of a split meet: on one host (the mp executor, or a Ray cluster of one node) through a file
store, so no TCP listener is opened (torch's store answers anyone on every interface, unauthenticated); on
a Ray cluster of several hosts through the head's TCP store, with a warning to firewall its port. Ray itself
is replaced by a stand-in that records what the executor asks of it (tests/parallel/test_serve_ray.py runs
the real thing)."""

from __future__ import annotations

import logging
import os
import sys
import types

import pytest

from shoal.config import EngineConfig
from shoal.parallel.executor import RayExecutor


def fake_ray(alive_nodes: int) -> types.ModuleType:
    ray = types.ModuleType("ray")
    ray.calls = []

    class Actor:
        class run:
            @staticmethod
            def remote(*args):
                ray.calls.append(args)
                return object()

    ray.init = lambda **kwargs: None
    ray.nodes = lambda: [{"Alive": True, "NodeManagerAddress": f"10.0.0.{i}"} for i in range(alive_nodes)] + [
        {"Alive": False, "NodeManagerAddress": "10.0.0.99"}]
    ray.util = types.SimpleNamespace(get_node_ip_address=lambda: "10.0.0.0")
    ray.remote = lambda **kwargs: (lambda cls: types.SimpleNamespace(remote=Actor))
    ray.wait = lambda pending, num_returns: (pending[:1], pending[1:])  # the watch thread ends at once
    ray.get = lambda ref: None
    ray.kill = lambda actor: None
    return ray


def start(monkeypatch, alive_nodes: int):
    ray = fake_ray(alive_nodes)
    monkeypatch.setitem(sys.modules, "ray", ray)
    executor = RayExecutor()
    rank, world, local_rank, addr, port = executor.start(EngineConfig(model="unused", tp=2,
                                                                      distributed_executor="ray"))
    return executor, ray, (rank, world, addr, port)


def test_a_one_node_ray_cluster_meets_through_a_file_store(monkeypatch):
    executor, ray, (rank, world, addr, port) = start(monkeypatch, alive_nodes=1)
    assert (rank, world) == (0, 2)
    assert addr.startswith("file://") and port == 0
    directory = os.path.dirname(addr.removeprefix("file://"))
    assert os.path.isdir(directory)
    assert [call[1:] for call in ray.calls] == [(1, 2, 0, addr, 0)]  # the worker is told the same store
    executor.stop()
    assert not os.path.exists(directory)  # removed with the executor


def test_a_cluster_of_several_hosts_meets_over_tcp_and_says_to_firewall_it(monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="shoal.parallel"):
        executor, ray, (rank, world, addr, port) = start(monkeypatch, alive_nodes=2)
    assert addr == "10.0.0.0" and port > 0
    assert "every interface" in caplog.text and str(port) in caplog.text
    executor.stop()


@pytest.fixture(autouse=True)
def _no_real_ray_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
