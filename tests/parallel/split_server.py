"""`shoal serve` of a split model as a subprocess, for the split serving tests (test_serve_split,
test_serve_ray): start it, gather what it prints, wait until it is healthy, stop it."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai

from conftest import subprocess_env

SERVE = "import sys; from shoal.cli import main; sys.exit(main(sys.argv[1:]))"
BOUND_S = 15  # a failure must reach the client, /health and the exit code within this


def free_port() -> int:
    """A port free now and unlikely to be taken before the server binds it, minutes later.

    A port from bind(("", 0)) lies in the kernel's ephemeral range, which every outgoing connection (Ray's
    workers talking to their head, the collectives' stores) also draws from: one of them took such a port
    between the test choosing it and the server binding it. So choose below that range, above Ray's
    worker ports (10002-19999), and check that it binds."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    candidates = list(range(20000, low))
    random.shuffle(candidates)
    for port in candidates[:200]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    from shoal.parallel.executor import free_port as ephemeral

    return ephemeral()


def serve(path: Path, port: int, *extra: str, env: dict | None = None, collective_timeout: float = 20) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SERVE, "serve", "--model", str(path), "--port", str(port), "--dtype", "float32",
         "--served-model-name", "tiny", "--kv-cache-memory", "1MiB", "--device", "cpu", "--log-level", "warning",
         "--collective-timeout", str(collective_timeout), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env or subprocess_env(),
    )


def collect(process: subprocess.Popen) -> list[str]:
    """The lines the process prints, gathered by a thread as they come."""
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
    return lines


def wait_healthy(port: int, process: subprocess.Popen, lines: list[str], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "".join(lines)
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server did not become healthy:\n" + "".join(lines))


def descendants(pid: int, marker: bytes) -> list[int]:
    """The processes below `pid` (children, their children, ...) whose command line holds `marker`."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found = []
    for child in parents:
        ancestor = parents.get(child)
        while ancestor is not None and ancestor != pid:
            ancestor = parents.get(ancestor)
        if ancestor == pid:
            try:
                if marker in Path(f"/proc/{child}/cmdline").read_bytes():
                    found.append(child)
            except OSError:
                continue
    return found


def error_after_killing(stream, pid: int) -> tuple[str | None, float]:
    """Kill process `pid` (SIGKILL) once the openai `stream` has given its first chunk, then read the stream
    to its end: (the text of the error it raised, or None; when the kill was sent, time.monotonic())."""
    next(iter(stream))
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    try:
        for _ in stream:
            pass
    except openai.APIError as exc:
        return str(exc), killed_at
    return None, killed_at


def stop(*processes: subprocess.Popen) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()
