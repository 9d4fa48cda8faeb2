"""Fixtures for the server tests: `serve(llm, **build_app options)` starts a real server in a thread."""

from __future__ import annotations

import pytest
from server_harness import API_KEY, MODEL, RunningServer


@pytest.fixture(scope="module")
def serve():
    """serve(llm, **build_app options) -> RunningServer; every server started is stopped after the module."""
    from shoal.server.app import build_app

    started: list[RunningServer] = []

    def start(llm, **options) -> RunningServer:
        options.setdefault("served_model_name", MODEL)
        options.setdefault("api_key", API_KEY)
        server = RunningServer(build_app(llm, **options))
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def llama(checkpoint):
    """(folder, transformers model) of the tiny Llama test checkpoint."""
    return checkpoint("llama")


@pytest.fixture(scope="module")
def llama_server(llama, serve):
    """A server of the tiny Llama in float32 (its outputs compared with transformers')."""
    from shoal import LLM

    return serve(LLM(str(llama[0]), dtype="float32", progress=False))
