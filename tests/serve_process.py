"""A `shoal serve` started as a subprocess by a test: where it listens, and everything it printed."""

from __future__ import annotations

import re
import subprocess
import threading
import time


def listening_port(process: subprocess.Popen, timeout: float = 60.0) -> tuple[int, list[str]]:
    """Read the server's output (stdout, text, with stderr folded in) until uvicorn says where it listens.
    Returns the port and the list of lines, which a thread then goes on filling with the rest of the
    output, for assertions on what the server said; fails with every line so far if no port came."""
    lines: list[str] = []
    port = None
    deadline = time.monotonic() + timeout
    while port is None and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
        port = int(found.group(1)) if found else None
    assert port is not None, "".join(lines)
    threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
    return port, lines
