"""Bounds on the work an untrusted client can make the server do before the engine sees a request.

- Connections (`GuardedH11Protocol`, uvicorn's h11 protocol with limits): at most `max_connections`
  open (more are answered 503 and closed), a request head must arrive whole within `header_timeout`
  (a slowloris connection is answered 408 and closed) and stay under `max_header_bytes` (431).
- Bodies: GuardMiddleware (app.py) reads each within `body_timeout` (408) and `max_body_bytes` (413).
- Clients (`ClientConcurrencyMiddleware`): at most `max_requests_per_client` requests in flight from
  one address (off by default: every local client shares 127.0.0.1); more get 429.
- Tokenizing (`TokenizerPool`): its own threads, apart from asyncio's default pool; prompts over
  `SMALL_PROMPT_BYTES` queue in a lane of their own, so a flood of long prompts never delays a short one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

T = TypeVar("T")

SMALL_PROMPT_BYTES = 16 << 10


@dataclass(frozen=True)
class ServerLimits:
    header_timeout: float = 10.0  # seconds for a request's line and headers, from its first byte (or the connection)
    body_timeout: float = 60.0  # seconds to read a request body once its headers are in
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection stays open
    max_connections: int = 1024  # open connections at once; a file descriptor each
    max_header_bytes: int = 64 << 10  # request line and headers together
    tokenizer_threads: int = 2  # threads for long prompts (short ones have two of their own)
    max_requests_per_client: int | None = None  # requests in flight from one client address; None: no cap

    def __post_init__(self) -> None:
        for name in ("header_timeout", "body_timeout", "keep_alive_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)!r}")
        if self.max_requests_per_client is not None and not (
                isinstance(self.max_requests_per_client, int) and self.max_requests_per_client >= 1):
            raise ValueError(f"max_requests_per_client must be a positive integer, got {self.max_requests_per_client!r}")
        for name in ("max_connections", "max_header_bytes", "tokenizer_threads"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")


def _raw_response(status: int, reason: str, message: str, code: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error" if status < 500 else
                                 "server_error", "param": None, "code": code}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n")
    return head.encode("ascii") + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with a connection cap, a header read timeout and a 431 for oversized heads.

    uvicorn times out only idle keep-alive connections; a client that opens a connection and sends its
    head a byte at a time would hold it (and its file descriptor) for ever."""

    limits = ServerLimits()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.limits.max_connections:
            self._refuse(503, "Service Unavailable", f"the server has {self.limits.max_connections} connections "
                         "open, its limit; retry later", "too_many_connections")
            return
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._refuse(408, "Request Timeout", f"the request's headers did not arrive within "
                         f"{self.limits.header_timeout:g} s", "request_timeout")

    def _refuse(self, status: int, reason: str, message: str, code: str) -> None:
        self._disarm_head_timer()
        if not self.transport.is_closing():
            self.transport.write(_raw_response(status, reason, message, code))
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # a request head is (still) coming
            if self._head_bytes == 0:
                self._arm_head_timer()
            end = data.find(b"\r\n\r\n")
            self._head_bytes += len(data) if end == -1 else end
            if self._head_bytes > self.limits.max_header_bytes:
                self._refuse(431, "Request Header Fields Too Large", f"the request line and headers are larger "
                             f"than {self.limits.max_header_bytes} bytes", "headers_too_large")
                return
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is in: the body has its own timeout
            self._head_bytes = 0
            self._disarm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._head_bytes = 0  # the keep-alive timeout covers the wait for the next request

    def connection_lost(self, exc) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)


def uvicorn_config(app, host: str, port: int, limits: ServerLimits, **options):
    """A uvicorn.Config serving `app` through GuardedH11Protocol under `limits`."""
    import uvicorn

    protocol = type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})
    # h11's own buffer limit answers a bare 400; ours (checked first) answers 431.
    return uvicorn.Config(app, host=host, port=port, http=protocol, timeout_keep_alive=limits.keep_alive_timeout,
                          h11_max_incomplete_event_size=limits.max_header_bytes + (64 << 10), **options)


class ClientConcurrencyMiddleware:
    """Answers 429 to a client address that already has `limit` requests in flight (the /v1 ones)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit
        self.in_flight: dict[str, int] = {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("?", 0))[0]
        if self.in_flight.get(client, 0) >= self.limit:
            body = json.dumps({"error": {"message": f"this client already has {self.limit} requests in flight, "
                                         "the server's limit per client; wait for one to finish",
                                         "type": "server_overloaded", "param": None,
                                         "code": "too_many_requests_from_client"}}).encode()
            await send({"type": "http.response.start", "status": 429, "headers": [
                (b"content-type", b"application/json"), (b"retry-after", b"1"),
                (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        self.in_flight[client] = self.in_flight.get(client, 0) + 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight[client] -= 1
            if not self.in_flight[client]:
                del self.in_flight[client]


class TokenizerPool:
    """Threads that tokenize and render chat templates, apart from asyncio's default pool: short prompts
    (under SMALL_PROMPT_BYTES) in one lane, longer ones in another of `threads` threads, so one client's
    long prompts queue behind each other and never in front of everyone's short ones."""

    def __init__(self, threads: int = 2) -> None:
        # Two short-prompt threads: one chat template slow to render (up to its 2 s limit) leaves the other.
        self._small = ThreadPoolExecutor(2, thread_name_prefix="shoal-tokenize")
        self._large = ThreadPoolExecutor(threads, thread_name_prefix="shoal-tokenize-long")

    async def run(self, size: int, fn: Callable[[], T]) -> T:
        lane = self._small if size < SMALL_PROMPT_BYTES else self._large
        return await asyncio.get_running_loop().run_in_executor(lane, fn)

    def shutdown(self) -> None:
        self._small.shutdown(wait=False, cancel_futures=True)
        self._large.shutdown(wait=False, cancel_futures=True)
