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
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                       help="uvicorn's log level")
    return serve


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from shoal.engine.async_engine import DEFAULT_MAX_WAITING
    from shoal.llm import LLM
    from shoal.server.app import build_app

    llm = LLM(
        args.model,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory=args.kv_cache_memory,
        **llm_options(args),
    )
    print(f"shoal: {llm.kv_pool.describe()}", file=sys.stderr, flush=True)
    app = build_app(llm, served_model_name=args.served_model_name, api_key=args.api_key,
                    max_waiting=args.max_waiting or DEFAULT_MAX_WAITING, tool_call_parser=args.tool_call_parser,
                    reasoning_parser=args.reasoning_parser)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=10, lifespan="on")
    server = _aborting_server(config, app)
    failed: list[str] = []
    if llm.parallel is not None:
        threading.Thread(target=_exit_on_failure, args=(server, app.state.engine, failed), daemon=True).start()
    try:
        server.run()
    finally:
        llm.shutdown()
    if failed:
        print(f"shoal: error: {failed[0]}; the server stopped", file=sys.stderr, flush=True)
        return 1
    return 0


FAILED_EXIT_DELAY_S = 5.0  # /health answers 503 this long after a failure, then the process exits


def _exit_on_failure(server, engine, failed: list[str]) -> None:
    """A split model cannot run without every rank: once the engine has failed (a worker died, or a
    collective timed out), report which rank, keep answering 503 for a moment, then stop the server."""
    while not server.should_exit:
        reason = (engine.failure_reason or "the engine failed") if not engine.healthy else None
        if reason is not None:
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
