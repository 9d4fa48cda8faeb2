"""A served app whose engine answers every request with a scripted text, for tests of what the server
makes of a model's output (tool calls, reasoning) without a model that writes it."""

from __future__ import annotations


def script_engine(server, monkeypatch, text: str):
    """Replace the app's engine: each request gets `Script.text` (`text` until a test sets another),
    three characters a step; a trailing "</s>" comes whole in the last delta, as the engine's detokenizer
    gives an end-of-sequence token. `Script.params` holds the last request's SamplingParams."""
    import asyncio

    from shoal.engine.async_engine import Delta, RequestStream

    class Script:
        params = []

    Script.text = text

    def add_request(request_id, items, prompt=None):
        Script.params = [p for _, p in items]
        loop = asyncio.get_running_loop()
        stream = RequestStream(request_id, len(items), loop)
        body, eos = (Script.text[:-4], ["</s>"]) if Script.text.endswith("</s>") else (Script.text, [])
        pieces = [body[i : i + 3] for i in range(0, len(body), 3)] + eos
        for index, (ids, _) in enumerate(items):
            for step, piece in enumerate(pieces):
                last = step == len(pieces) - 1
                loop.call_soon(stream._put, Delta(index, [5], piece, None, "stop" if last else None, len(ids), step + 1))
        return stream

    monkeypatch.setattr(server.app.state.engine, "add_request", add_request)
    return Script
