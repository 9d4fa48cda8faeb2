"""The chat page at `/`, in a real headless Chromium driven over the DevTools protocol: the page loads from the
package alone (no CDN), a typed message gets a reply that streams in, and Stop ends a reply mid-stream (its
request aborted on the server). Skipped where Chromium is not installed (Debian: apt-get install chromium).

SHOAL_CHAT_SCREENSHOT=path.png saves what the page looks like after the first reply (docs/chat-page.png)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import httpx
import pytest
from server_harness import API_KEY

from shoal import LLM

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (Debian: apt-get install chromium)")
STATIC = Path(__file__).resolve().parents[2] / "shoal" / "server" / "static"


class Page:
    """One browser tab over the DevTools protocol (its websocket), just enough to drive a page."""

    def __init__(self, websocket_url: str) -> None:
        from websockets.sync.client import connect

        self.socket = connect(websocket_url, max_size=1 << 26, open_timeout=30)
        self.ids = itertools.count(1)

    def call(self, method: str, **params) -> dict:
        call_id = next(self.ids)
        self.socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(message["error"])
                return message["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {expression}")

    def close(self) -> None:
        self.socket.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    pytest.importorskip("websockets")
    profile = tmp_path_factory.mktemp("chromium")
    process = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
                                f"--user-data-dir={profile}", "--window-size=1000,700", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while not (port_file.is_file() and port_file.read_text().strip()):
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            pytest.fail("Chromium did not start its DevTools endpoint")
        time.sleep(0.1)
    port = int(port_file.read_text().split()[0])
    yield port
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def server(serve):
    return serve(LLM(progress=False))


@pytest.fixture
def page(browser, server):
    with urllib.request.urlopen(f"http://127.0.0.1:{browser}/json/list", timeout=30) as response:
        target = next(t for t in json.load(response) if t["type"] == "page")
    tab = Page(target["webSocketDebuggerUrl"])
    tab.call("Page.enable")
    tab.call("Page.navigate", url=f"{server.url}/")
    tab.wait_for("document.readyState === 'complete' && !!document.getElementById('send')")
    tab.js(f"document.getElementById('api-key').value = {json.dumps(API_KEY)};"
           "document.getElementById('api-key').dispatchEvent(new Event('change'))")
    tab.wait_for("document.getElementById('model').textContent === 'tiny'")
    yield tab
    tab.close()


def test_the_page_ships_in_the_package_and_needs_nothing_from_elsewhere(server):
    page = httpx.get(f"{server.url}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for name in ("chat.js", "chat.css"):
        assert httpx.get(f"{server.url}/static/{name}", timeout=10).status_code == 200
    for file in STATIC.iterdir():  # no CDN, no external font or script: users may be offline
        text = file.read_text(encoding="utf-8")
        assert "http://" not in text and "https://" not in text, file.name


def test_a_message_gets_a_streamed_reply(page):
    page.js("window.updates = 0; new MutationObserver(() => window.updates++).observe("
            "document.getElementById('log'), {subtree: true, childList: true, characterData: true})")
    page.js("document.getElementById('max-tokens').value = '40'; document.getElementById('temperature').value = '0';"
            "document.getElementById('input').value = 'The list type'; document.getElementById('send').click()")
    page.wait_for("document.querySelector('.turn.user') && document.querySelector('.turn.user').textContent")
    page.wait_for("!document.getElementById('send').disabled && document.querySelector('.assistant .content')"
                  ".textContent.length > 0")
    reply = page.js("document.querySelector('.assistant .content').textContent")
    assert reply.strip() and "Error" not in reply
    assert page.js("window.updates") > 3  # the text arrived piece by piece, not at once
    screenshot = os.environ.get("SHOAL_CHAT_SCREENSHOT")
    if screenshot:
        import base64

        Path(screenshot).write_bytes(base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"]))


def test_stop_ends_a_reply_mid_stream(page, server, monkeypatch):
    from shoal.engine.async_engine import Delta, RequestStream

    engine = server.app.state.engine
    aborted: list[str] = []

    def endless(request_id, items, prompt=None):  # a reply that only Stop can end
        loop = asyncio.get_running_loop()
        stream = RequestStream(request_id, len(items), loop)

        def more(step: int) -> None:
            if request_id not in aborted:
                stream._put(Delta(0, [5], f"word{step} ", None, None, 3, step + 1))
                loop.call_later(0.05, more, step + 1)

        loop.call_soon(more, 0)
        return stream

    monkeypatch.setattr(engine, "add_request", endless)
    monkeypatch.setattr(engine, "abort", aborted.append)
    page.js("document.getElementById('input').value = 'Talk forever'; document.getElementById('send').click()")
    page.wait_for("document.querySelector('.assistant .content') && "
                  "document.querySelector('.assistant .content').textContent.includes('word3')")
    assert page.js("document.getElementById('stop').disabled") is False
    page.js("document.getElementById('stop').click()")
    page.wait_for("document.getElementById('status').textContent === 'stopped'")
    assert page.js("document.getElementById('send').disabled") is False
    deadline = time.monotonic() + 10
    while not aborted and time.monotonic() < deadline:  # the server saw the client go and aborted the request
        time.sleep(0.05)
    assert aborted
    shown = page.js("document.querySelector('.assistant .content').textContent")
    time.sleep(0.3)
    assert page.js("document.querySelector('.assistant .content').textContent") == shown  # nothing more arrives
