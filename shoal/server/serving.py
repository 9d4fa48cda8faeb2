"""The OpenAI endpoints' work: parse and bound a request, tokenize it off the event loop, submit its
completions to the AsyncEngine, and answer with one JSON body or a stream of server-sent events.

A request is cut off — its sequences aborted and their KV blocks freed — as soon as its client goes away.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from shoal.engine.async_engine import AsyncEngine, RequestStream
from shoal.errors import EngineUnavailableError, InvalidRequestError, QueueFullError, ShoalError, TokenizerError
from shoal.outputs import TokenLogprob
from shoal.server.protocol import (
    MAX_CHOICES,
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
    error_body,
    sampling_params,
    stream_usage,
)

logger = logging.getLogger("shoal.server")

M = TypeVar("M", bound=BaseModel)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
INTERNAL_ERROR = "The server had an error while processing your request."
_TOKEN_CACHE_LIMIT = 1 << 18
_UNION_TAG = re.compile(r"(str|int|float|bool|list|dict|constrained-\w+|function-\w+)(\[.*\])?|[A-Z]\w*")


def sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _finite(value: float) -> float:
    # JSON has no -Infinity; a logprob that underflowed is reported as a very unlikely finite value.
    return value if math.isfinite(value) else -9999.0


def request_error(exc: BaseException) -> RequestError:
    """The error a known failure becomes; anything else is a bug (500, its text never shown)."""
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, (InvalidRequestError, TokenizerError)):
        return RequestError(str(exc))
    if isinstance(exc, QueueFullError):
        return RequestError(str(exc), 429, "server_overloaded", code="queue_full",
                            headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, EngineUnavailableError):
        return RequestError(str(exc), 503, "server_error", code="engine_unavailable")
    return RequestError(INTERNAL_ERROR, 500, "server_error")


async def parse(model: type[M], body: bytes) -> M:
    try:
        return await asyncio.to_thread(model.model_validate_json, body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        if first.get("type") == "json_invalid":
            raise RequestError(f"the request body is not valid JSON: {first.get('msg')}") from None
        # pydantic names the union member it tried ("str", "list[int]", ...): not a field, leave it out.
        loc = [str(p) for p in first.get("loc", ()) if not (isinstance(p, str) and _UNION_TAG.fullmatch(p))]
        if loc == ["prompt"] and len(errors) > 1:
            message = "prompt must be a string, a list of strings, a list of token ids or a list of such lists"
        else:
            message = f"{'.'.join(loc)}: {first.get('msg')}" if loc else str(first.get("msg"))
        raise RequestError(message, param=loc[0] if loc else None) from None


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class _Prepared:
    prompts: list[tuple[str | None, list[int]]]  # (text to echo, ids) per prompt
    params: list  # SamplingParams per completion of one prompt


class OpenAIServing:
    def __init__(self, llm, engine: AsyncEngine, model_name: str, max_prompt_bytes: int) -> None:
        self.llm, self.engine, self.model_name = llm, engine, model_name
        self.tokenizer = llm.tokenizer
        self.max_model_len = llm.engine.max_model_len
        self.vocab_size = llm.engine.model.config.vocab_size
        self.max_prompt_bytes = max_prompt_bytes
        self._token_text: dict[int, str] = {}

    # ---- shared -----------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise RequestError(f"The model `{name}` does not exist.", 404, param="model", code="model_not_found")

    def _check_prompt_bytes(self, size: int) -> None:
        if size > self.max_prompt_bytes:
            raise RequestError(
                f"the prompt is {size} bytes; this server takes at most {self.max_prompt_bytes}", param="prompt"
            )

    def _check_ids(self, ids: list[int], max_tokens: int | None) -> None:
        try:
            self.llm.engine.check_prompt(ids)
        except InvalidRequestError as exc:
            raise RequestError(str(exc), param="prompt") from None
        if max_tokens is not None and len(ids) + max_tokens > self.max_model_len:
            raise RequestError(
                f"this model's context is {self.max_model_len} tokens, but the prompt has {len(ids)} and "
                f"max_tokens asks for {max_tokens} more; lower max_tokens or shorten the prompt",
                param="max_tokens",
            )

    def _params(self, request, max_tokens: int | None, logprobs: int | None) -> list:
        if max_tokens is not None and max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        for token in request.stop_token_ids or []:
            if not 0 <= token < self.vocab_size:
                raise RequestError(f"stop token id {token} is outside the vocabulary", param="stop_token_ids")
        try:
            return sampling_params(request, max_tokens or self.max_model_len, logprobs)
        except InvalidRequestError as exc:
            raise RequestError(str(exc)) from None

    def _token(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            if len(self._token_text) < _TOKEN_CACHE_LIMIT:
                self._token_text[token_id] = text
        return text

    def _submit(self, prefix: str, prepared: _Prepared) -> tuple[str, RequestStream]:
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        items = [(ids, params) for _, ids in prepared.prompts for params in prepared.params]
        prompt = prepared.prompts[0][0] if len(prepared.prompts) == 1 else None
        try:
            return request_id, self.engine.add_request(request_id, items, prompt)
        except ShoalError as exc:  # mapped to its HTTP status
            raise request_error(exc) from None

    async def _until_done(self, request: Request, request_id: str, stream: RequestStream,
                          work: Callable[[], Awaitable[Response]]) -> Response:
        """Run `work` to the end, unless the client disconnects first: then abort and free its blocks."""
        task = asyncio.ensure_future(work())
        watcher = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            return Response(status_code=499)  # nobody will read it
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
            if not stream.finished:
                self.engine.abort(request_id)

    async def _collect(self, stream: RequestStream, num_choices: int) -> list[_Choice]:
        choices = [_Choice() for _ in range(num_choices)]
        try:
            async for delta in stream:
                choice = choices[delta.index]
                choice.text.append(delta.text)
                choice.num_tokens = delta.num_output_tokens
                if delta.logprobs:
                    choice.logprobs.extend(delta.logprobs)
                if delta.finish_reason is not None:
                    choice.finish_reason = delta.finish_reason
        except EngineUnavailableError as exc:
            raise request_error(exc) from None
        return choices

    def _events(self, request_id: str, stream: RequestStream, chunks: AsyncIterator[str]) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            try:
                try:
                    async for chunk in chunks:
                        yield chunk
                except EngineUnavailableError as exc:
                    yield sse(request_error(exc).body())
                except Exception:  # a bug: say so without its text
                    logger.exception("error while streaming %s", request_id)
                    yield sse(error_body(INTERNAL_ERROR, "server_error"))
                yield "data: [DONE]\n\n"
            finally:  # also on cancellation, when the client went away
                if not stream.finished:
                    self.engine.abort(request_id)

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    # ---- /v1/completions ----------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        req = await parse(CompletionRequest, await request.body())
        self.check_model(req.model)
        if req.suffix:
            raise RequestError("suffix is not supported by this server", param="suffix", code="unsupported_parameter")
        n = req.n or 1
        if req.best_of is not None and req.best_of != n:
            raise RequestError("best_of other than n is not supported by this server", param="best_of",
                               code="unsupported_parameter")
        if req.echo and req.logprobs is not None:
            raise RequestError("echo with logprobs (prompt logprobs) is not supported by this server", param="echo",
                               code="unsupported_parameter")
        prompt = req.prompt
        if isinstance(prompt, str):
            prompts: list[tuple[str | None, list[int] | None]] = [(prompt, None)]
        elif prompt and isinstance(prompt[0], str):
            prompts = [(p, None) for p in prompt]
        elif prompt and isinstance(prompt[0], list):
            prompts = [(None, p) for p in prompt]
        else:
            prompts = [(None, prompt)]
        if len(prompts) * n > MAX_CHOICES:
            raise RequestError(f"prompts x n may be at most {MAX_CHOICES}", param="n")
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        explicit = req.max_tokens
        params = self._params(req, max_tokens, req.logprobs)

        def prepare() -> _Prepared:
            self._check_prompt_bytes(sum(len(t.encode("utf-8")) for t, _ in prompts if t is not None))
            ready = []
            for text, ids in prompts:
                if ids is None:
                    ids = self.tokenizer.encode(text)
                self._check_ids(ids, explicit)
                if req.echo and text is None:
                    text = self.tokenizer.decode(ids)
                ready.append((text, ids))
            return _Prepared(ready, params)

        prepared = await asyncio.to_thread(prepare)
        request_id, stream = self._submit("cmpl", prepared)
        created = int(time.time())
        if req.stream:
            chunks = self._completion_chunks(req, prepared, request_id, stream, created, n)
            return self._events(request_id, stream, chunks)
        work = partial(self._completion_response, req, prepared, request_id, stream, created, n)
        return await self._until_done(request, request_id, stream, work)

    def _completion_logprobs(self, logprobs: list[TokenLogprob], offset: int) -> tuple[dict, int]:
        tokens, values, tops, offsets = [], [], [], []
        for lp in logprobs:
            token = self._token(lp.token_id)
            tokens.append(token)
            values.append(_finite(lp.logprob))
            top: dict[str, float] = {}
            for t, v in lp.top_logprobs.items():  # most likely first: keep that one when two ids read the same
                top.setdefault(self._token(t), _finite(v))
            tops.append(top)
            offsets.append(offset)
            offset += len(token)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}, offset

    async def _completion_response(self, req: CompletionRequest, prepared: _Prepared, request_id: str,
                                   stream: RequestStream, created: int, n: int) -> Response:
        collected = await self._collect(stream, len(prepared.prompts) * n)
        choices = []
        for index, choice in enumerate(collected):
            echo = (prepared.prompts[index // n][0] or "") if req.echo else ""
            logprobs = None
            if req.logprobs is not None:
                logprobs, _ = self._completion_logprobs(choice.logprobs, len(echo))
            choices.append({"index": index, "text": echo + "".join(choice.text), "logprobs": logprobs,
                            "finish_reason": choice.finish_reason})
        usage = self._usage(sum(len(ids) for _, ids in prepared.prompts), sum(c.num_tokens for c in collected))
        return JSONResponse({"id": request_id, "object": "text_completion", "created": created,
                             "model": self.model_name, "choices": choices, "usage": usage})

    async def _completion_chunks(self, req: CompletionRequest, prepared: _Prepared, request_id: str,
                                 stream: RequestStream, created: int, n: int) -> AsyncIterator[str]:
        include_usage = stream_usage(req)
        base = {"id": request_id, "object": "text_completion", "created": created, "model": self.model_name}

        def chunk(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> str:
            body = {**base, "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                         "finish_reason": finish_reason}]}
            if include_usage:
                body["usage"] = None
            return sse(body)

        num_choices = len(prepared.prompts) * n
        offsets = [0] * num_choices
        tokens = [0] * num_choices
        if req.echo:
            for index in range(num_choices):
                text = prepared.prompts[index // n][0] or ""
                offsets[index] = len(text)
                yield chunk(index, text, None, None)
        async for delta in stream:
            tokens[delta.index] = delta.num_output_tokens
            logprobs = None
            if req.logprobs is not None:
                logprobs, offsets[delta.index] = self._completion_logprobs(delta.logprobs or [], offsets[delta.index])
            if delta.text or delta.finish_reason is not None or (logprobs and logprobs["tokens"]):
                yield chunk(delta.index, delta.text, logprobs, delta.finish_reason)
        if include_usage:
            usage = self._usage(sum(len(ids) for _, ids in prepared.prompts), sum(tokens))
            yield sse({**base, "choices": [], "usage": usage})

    # ---- /v1/chat/completions -------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        req = await parse(ChatCompletionRequest, await request.body())
        self.check_model(req.model)
        if req.tools:
            raise RequestError("tools are not supported by this server", param="tools", code="unsupported_parameter")
        if req.tool_choice not in (None, "none", "auto"):
            raise RequestError("tool_choice is not supported by this server", param="tool_choice",
                               code="unsupported_parameter")
        if req.response_format is not None and req.response_format.type != "text":
            raise RequestError("response_format other than text is not supported by this server",
                               param="response_format", code="unsupported_parameter")
        if req.top_logprobs is not None and not req.logprobs:
            raise RequestError("top_logprobs needs logprobs set to true", param="top_logprobs")
        n = req.n or 1
        messages = []
        for i, message in enumerate(req.messages):
            content = message.content
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part.type != "text" or part.text is None:
                        raise RequestError("only text content parts are supported by this server",
                                           param=f"messages.{i}.content", code="unsupported_content")
                    parts.append(part.text)
                content = "".join(parts)
            messages.append({"role": message.role, "content": content or ""})
        explicit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self._params(req, explicit, logprobs)

        def prepare() -> _Prepared:
            self._check_prompt_bytes(sum(len(m["content"].encode("utf-8")) for m in messages))
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt)
            self._check_ids(ids, explicit)
            return _Prepared([(None, ids)], params)

        try:
            prepared = await asyncio.to_thread(prepare)
        except TokenizerError as exc:
            raise RequestError(str(exc), param="messages") from None
        request_id, stream = self._submit("chatcmpl", prepared)
        created = int(time.time())
        if req.stream:
            return self._events(request_id, stream, self._chat_chunks(req, prepared, stream, request_id, created, n))
        work = partial(self._chat_response, req, prepared, request_id, stream, created, n)
        return await self._until_done(request, request_id, stream, work)

    def _chat_logprobs(self, logprobs: list[TokenLogprob]) -> list[dict]:
        def entry(token_id: int, value: float) -> dict:
            token = self._token(token_id)
            return {"token": token, "logprob": _finite(value), "bytes": list(token.encode("utf-8"))}

        return [{**entry(lp.token_id, lp.logprob),
                 "top_logprobs": [entry(t, v) for t, v in lp.top_logprobs.items()]} for lp in logprobs]

    async def _chat_response(self, req: ChatCompletionRequest, prepared: _Prepared, request_id: str,
                             stream: RequestStream, created: int, n: int) -> Response:
        collected = await self._collect(stream, n)
        choices = [
            {
                "index": index,
                "message": {"role": "assistant", "content": "".join(choice.text)},
                "logprobs": {"content": self._chat_logprobs(choice.logprobs)} if req.logprobs else None,
                "finish_reason": choice.finish_reason,
            }
            for index, choice in enumerate(collected)
        ]
        usage = self._usage(len(prepared.prompts[0][1]), sum(c.num_tokens for c in collected))
        return JSONResponse({"id": request_id, "object": "chat.completion", "created": created,
                             "model": self.model_name, "choices": choices, "usage": usage})

    async def _chat_chunks(self, req: ChatCompletionRequest, prepared: _Prepared, stream: RequestStream,
                           request_id: str, created: int, n: int) -> AsyncIterator[str]:
        include_usage = stream_usage(req)
        base = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": self.model_name}

        def chunk(index: int, delta: dict, logprobs: list | None, finish_reason: str | None) -> str:
            body = {**base, "choices": [{"index": index, "delta": delta,
                                         "logprobs": None if logprobs is None else {"content": logprobs},
                                         "finish_reason": finish_reason}]}
            if include_usage:
                body["usage"] = None
            return sse(body)

        for index in range(n):
            yield chunk(index, {"role": "assistant", "content": ""}, None, None)
        tokens = [0] * n
        async for delta in stream:
            tokens[delta.index] = delta.num_output_tokens
            logprobs = self._chat_logprobs(delta.logprobs or []) if req.logprobs else None
            if delta.text or delta.finish_reason is not None or logprobs:
                yield chunk(delta.index, {"content": delta.text} if delta.text else {}, logprobs, delta.finish_reason)
        if include_usage:
            yield sse({**base, "choices": [], "usage": self._usage(len(prepared.prompts[0][1]), sum(tokens))})

    # ---- /v1/models ------------------------------------------------------------------------------
    def model_card(self, created: int) -> dict:
        return {"id": self.model_name, "object": "model", "created": created, "owned_by": "shoal",
                "max_model_len": self.max_model_len}


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return

