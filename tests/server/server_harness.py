"""A real uvicorn server on 127.0.0.1 (a free port) in a thread, and the few helpers the server tests share."""

from __future__ import annotations

import re
import socket
import threading
import time

import httpx
import openai
import uvicorn

from shoal.server.limits import uvicorn_config

API_KEY = "test-key"
MODEL = "tiny"


class RunningServer:
    def __init__(self, app) -> None:
        self.app = app
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # As `shoal serve` serves: through the guarded protocol, under the app's limits.
        config = uvicorn_config(app, "127.0.0.1", self.port, app.state.limits, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)

    def client(self, api_key: str = API_KEY, **options) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60, **options)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)

    def post(self, path: str, **options) -> httpx.Response:
        headers = {"Authorization": f"Bearer {API_KEY}", **options.pop("headers", {})}
        return httpx.post(f"{self.url}{path}", headers=headers, timeout=options.pop("timeout", 30), **options)

    def metrics(self) -> dict[str, float]:
        """Series name (with its labels other than model_name) -> value."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        values = {}
        for line in text.splitlines():
            if line.startswith("#") or not line:
                continue
            series, value = line.rsplit(" ", 1)
            series = re.sub(r'model_name="[^"]*",?', "", series).replace("{}", "")
            values[series] = float(value)
        return values

    def wait_for_metrics(self, check, timeout: float = 10.0) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            values = self.metrics()
            if check(values) or time.monotonic() > deadline:
                return values
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
