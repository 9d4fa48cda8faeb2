"""Loopback means loopback: a server bound to 127.0.0.1 answers only requests addressed to a loopback name.

A web page the user visits can make the browser send requests to 127.0.0.1 (DNS rebinding points a
name it controls there; a cross-site POST with a `text/plain` body needs no preflight). The browser
then still sends that page's Host and Origin, so checking them closes the hole (Ollama's
CVE-2024-28224 is this class). A reverse proxy in front names the hosts it forwards with
--allowed-hosts. The ASGI middleware sits outside everything else (GuardMiddleware in app.py).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def is_loopback(host: str) -> bool:
    """Whether a bind address (or Host name) reaches this machine only: 127.0.0.0/8, ::1 or localhost."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts_for(bind_host: str, extra: Iterable[str] = ()) -> frozenset[str] | None:
    """The Host names a server bound to `bind_host` answers: loopback names (and `extra`) on a loopback
    bind; on another bind only `extra` when given, else None (any Host: the bind itself is public)."""
    extra = frozenset(_normal(h) for h in extra if h)
    if "*" in extra:
        return None
    if is_loopback(bind_host):
        return LOOPBACK_NAMES | extra
    return extra or None


def _normal(host: str) -> str:
    return host.strip().strip("[]").lower()


def host_name(value: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1', 'Example.COM' -> 'example.com'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class HostCheckMiddleware:
    """Refuses (403, OpenAI error format) a request whose Host, or Origin when a browser sends one, names a
    host outside `allowed` — the sign of DNS rebinding or of a cross-site request from a web page."""

    def __init__(self, app: ASGIApp, allowed: frozenset[str]) -> None:
        self.app, self.allowed = app, allowed

    def _allows(self, host: str) -> bool:
        return host in self.allowed or (host.endswith(".localhost") and "localhost" in self.allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        host = host_name(headers.get(b"host", b"").decode("latin-1"))
        origin = headers.get(b"origin")
        problem = None
        if not self._allows(host):
            problem = f"this server answers requests for {', '.join(sorted(self.allowed))}, not Host {host[:64]!r}"
        elif origin is not None and origin != b"null":
            origin_host = host_name(urlsplit(origin.decode("latin-1")).netloc)
            if not self._allows(origin_host):
                problem = f"cross-origin requests from {origin_host[:64]!r} are not allowed"
        elif origin == b"null":
            problem = "requests from an opaque origin (a sandboxed page or a file) are not allowed"
        if problem is None:
            await self.app(scope, receive, send)
            return
        body = json.dumps({"error": {
            "message": f"{problem}; start the server with --allowed-hosts NAME (e.g. behind a reverse proxy)",
            "type": "invalid_request_error", "param": None, "code": "host_not_allowed"}}).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
