"""`shoal serve`: load a model and serve the OpenAI API with uvicorn until SIGINT or SIGTERM.

On a signal the server stops accepting connections, ends every request in flight with an error
(streams get it as an event, then [DONE]), stops the engine thread and exits 0. This module imports
only argparse at the top, so `shoal --help` stays fast.
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
import time

from shoal.model_options import add_model_options, llm_options, positive_int

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 10**3, "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
          "g": 1 << 30, "gib": 1 << 30, "gb": 10**9, "t": 1 << 40, "tib": 1 << 40, "tb": 10**12}


def parse_bytes(text: str) -> int:
    """'512MiB', '2GiB', '1.5G', '1000000' -> bytes (K, M, G without B are binary; KB, MB, GB decimal)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a size such as 512MiB or 2GiB, got {text!r}")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value < 1:
        raise argparse.ArgumentTypeError(f"the size must be at least 1 byte, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text!r}")
    return value


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    from shoal.server.tool_parsers import PARSERS
    from shoal.server.reasoning import REASONING_PARSERS

    serve = subparsers.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    add_model_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    serve.add_argument("--port", type=_port, default=8000, help="port to bind (0: any free port)")
    serve.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 endpoints")
    serve.add_argument("--served-model-name", default=None, help="the model name clients ask for (default: --model)")
    serve.add_argument("--max-waiting", type=positive_int, default=None,
                       help="sequences that may wait for a slot (default: 512); beyond it requests get 429")
    serve.add_argument("--max-num-seqs", type=positive_int, default=64, help="sequences batched together at most")
    serve.add_argument("--max-num-batched-tokens", type=positive_int, default=2048, help="tokens per step at most")
    serve.add_argument("--kv-cache-memory", type=parse_bytes, default=None,
                       help="bytes for the paged KV cache, e.g. 512MiB or 4GiB (default: sized from free memory)")
    serve.add_argument("--tool-call-parser", default=None, choices=sorted(PARSERS),
                       help="how the model's tool calls are read (default: chosen from the chat template's markers)")
    serve.add_argument("--reasoning-parser", default=None, choices=REASONING_PARSERS,
                       help="split a thinking model's <think>...</think> into reasoning_content (vLLM's names)")
    serve.add_argument("--allowed-hosts", default=None, metavar="NAMES",
                       help="comma-separated Host names the server answers besides the loopback ones (a reverse "
                            "proxy's), '*' for any; on a loopback bind every other Host and Origin gets 403")
    limits = serve.add_argument_group("connection limits")
    limits.add_argument("--header-timeout", type=_seconds, default=10.0,
                        help="seconds for a request's headers to arrive (default: 10); slower ones get 408")
    limits.add_argument("--body-timeout", type=_seconds, default=60.0,
                        help="seconds for a request's body to arrive once its headers are in (default: 60)")
    limits.add_argument("--keep-alive-timeout", type=_seconds, default=5.0,
                        help="seconds an idle keep-alive connection stays open (default: 5)")
    limits.add_argument("--max-connections", type=positive_int, default=1024,
                        help="open connections at most (default: 1024); more are answered 503 and closed")
    limits.add_argument("--max-header-bytes", type=parse_bytes, default=64 << 10,
                        help="size of a request's line and headers at most (default: 64KiB); larger get 431")
    limits.add_argument("--max-requests-per-client", type=positive_int, default=None,
                        help="/v1 requests in flight from one client address at most (default: no cap); more get 429")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                       help="uvicorn's log level")
    return serve


def cmd_serve(args: argparse.Namespace) -> int:
    from shoal.engine.async_engine import DEFAULT_MAX_WAITING
    from shoal.llm import LLM
    from shoal.server.app import build_app
    from shoal.server.limits import ServerLimits, uvicorn_config
    from shoal.server.security import allowed_hosts_for

    warning = bind_warning(args.host, args.api_key)
    if warning:
        print(f"shoal: warning: {warning}", file=sys.stderr, flush=True)
    llm = LLM(
        args.model,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory=args.kv_cache_memory,
        **llm_options(args),
    )
    print(f"shoal: {llm.kv_pool.describe()}", file=sys.stderr, flush=True)
    limits = ServerLimits(header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                          keep_alive_timeout=args.keep_alive_timeout, max_connections=args.max_connections,
                          max_header_bytes=args.max_header_bytes, max_requests_per_client=args.max_requests_per_client)
    extra_hosts = [h for h in (args.allowed_hosts or "").split(",") if h.strip()]
    app = build_app(llm, served_model_name=args.served_model_name, api_key=args.api_key,
                    max_waiting=args.max_waiting or DEFAULT_MAX_WAITING, tool_call_parser=args.tool_call_parser,
                    reasoning_parser=args.reasoning_parser, allowed_hosts=allowed_hosts_for(args.host, extra_hosts),
                    limits=limits)
    config = uvicorn_config(app, args.host, args.port, limits, log_level=args.log_level,
                            timeout_graceful_shutdown=10, lifespan="on")
    server = _aborting_server(config, app)
    failed: list[str] = []
    threading.Thread(target=_exit_on_failure, args=(server, app.state.engine, failed), daemon=True).start()
    try:
        server.run()
    finally:
        llm.shutdown()
    if failed:
        print(f"shoal: error: {failed[0]}; the server stopped", file=sys.stderr, flush=True)
        return 1
    return 0


def bind_warning(host: str, api_key: str | None) -> str | None:
    """What to tell the user who serves beyond this machine with no API key (None when bound to loopback, or keyed)."""
    from shoal.server.security import is_loopback

    if is_loopback(host) or api_key:
        return None
    return (f"serving on {host}, beyond this machine, without --api-key: anyone who can reach the port can use "
            "the model; pass --api-key KEY, or bind 127.0.0.1")


FAILED_EXIT_DELAY_S = 5.0  # /health answers 503 this long after a failure, then the process exits


def _exit_on_failure(server, engine, failed: list[str]) -> None:
    """Once the engine cannot continue (its step loop raised; a worker of a split model died, or a
    collective timed out), answer every request in flight with the error, say why, keep answering 503
    for a moment, then stop the server: it exits 1, so a supervisor restarts it (a process that stays up
    serving only 503s would never be restarted)."""
    while not server.should_exit:
        reason = (engine.failure_reason or "the engine failed") if not engine.healthy else None
        if reason is not None:
            engine.answer_failure()  # the engine thread may be stuck in a step: answer from here
            failed.append(reason)
            print(f"shoal: error: {reason}; the server stops in {FAILED_EXIT_DELAY_S:g} s", file=sys.stderr,
                  flush=True)
            time.sleep(FAILED_EXIT_DELAY_S)
            server.should_exit = True
            return
        time.sleep(0.2)


def _aborting_server(config, app):
    """A uvicorn.Server that, on SIGINT/SIGTERM, also ends the requests in flight (so draining the
    connections takes no time) and exits 0 once it has shut down cleanly."""
    import uvicorn

    class AbortingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # A signal handler must not take the engine's lock (the code it interrupted may hold it):
            # hand the abort to the event loop instead.
            loop = getattr(app.state, "loop", None)
            if loop is not None and not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(app.state.engine.abort_all, "the server is shutting down")
                except RuntimeError:
                    pass
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None) -> None:
            await super().shutdown(sockets)
            # uvicorn re-raises the signal once shut down, so the process would die of it.
            self._captured_signals.clear()

    return AbortingServer(config)
