"""The OpenAI endpoints' work: parse and bound a request, tokenize it off the event loop, submit its
completions to the AsyncEngine, and answer with one JSON body or a stream of server-sent events.

A request is cut off — its sequences aborted and their KV blocks freed — as soon as its client goes away.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
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
from shoal.errors import (
    EngineUnavailableError,
    GenerationError,
    InvalidRequestError,
    QueueFullError,
    ShoalError,
    TokenizerError,
)
from shoal.outputs import TokenLogprob
from shoal.server.conversation import conversation
from shoal.server.limits import TokenizerPool
from shoal.server.logprobs import LogprobFormatter
from shoal.server.protocol import (
    MAX_CHOICES,
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
    error_body,
    sampling_params,
    stream_usage,
)
from shoal.server.reasoning import REASONING_PARSERS
from shoal.server.reply import ReplyReader, plan_chat
from shoal.server.structured import compile_or_400, requested
from shoal.server.tool_parsers import PARSERS, parser_for_template

logger = logging.getLogger("shoal.server")

M = TypeVar("M", bound=BaseModel)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
INTERNAL_ERROR = "The server had an error while processing your request."
_TOKEN_CACHE_LIMIT = 1 << 18
_UNION_TAG = re.compile(r"(str|int|float|bool|list|dict|constrained-\w+|function-\w+)(\[.*\])?|[A-Z]\w*")


def sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


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
    if isinstance(exc, GenerationError):  # this request alone failed; its message names no internals
        return RequestError(str(exc), 500, "server_error", code="generation_failed")
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
        if len(loc) == 1 and loc[0] in model.union_messages and len(errors) > 1:
            message = model.union_messages[loc[0]]
        else:
            message = f"{'.'.join(loc)}: {first.get('msg')}" if loc else str(first.get("msg"))
        raise RequestError(message, param=loc[0] if loc else None) from None


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class _Prepared:
    prompts: list[tuple[str | None, list[int]]]  # (text to echo, ids) per prompt
    params: list  # SamplingParams per completion of one prompt


class OpenAIServing:
    def __init__(self, llm, engine: AsyncEngine, model_name: str, max_prompt_bytes: int,
                 tool_call_parser: str | None = None, reasoning_parser: str | None = None,
                 tokenizer_pool: TokenizerPool | None = None) -> None:
        self.llm, self.engine, self.model_name = llm, engine, model_name
        self.tokenizer = llm.tokenizer
        self.max_model_len = llm.engine.max_model_len
        self.vocab_size = llm.engine.model.config.vocab_size
        self.max_prompt_bytes = max_prompt_bytes
        self.tokenizer_pool = tokenizer_pool or TokenizerPool()
        self.max_token_bytes = self.tokenizer.max_token_bytes
        self._token_text: dict[int, str] = {}
        self.logprobs = LogprobFormatter(self._token)
        if tool_call_parser is not None and tool_call_parser not in PARSERS:
            raise ValueError(f"unknown tool-call parser {tool_call_parser!r}; known: {', '.join(sorted(PARSERS))}")
        templates = [self.tokenizer.chat_templates.get("tool_use"), self.tokenizer.chat_template]
        self.tool_parser = tool_call_parser or next((p for t in templates if (p := parser_for_template(t))), None)
        if reasoning_parser is not None and reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"unknown reasoning parser {reasoning_parser!r}; known: {', '.join(REASONING_PARSERS)}")
        self.reasoning_parser = reasoning_parser

    # ---- shared -----------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise RequestError(f"The model `{name}` does not exist.", 404, param="model", code="model_not_found")

    def _check_prompt_bytes(self, size: int) -> None:
        if size > self.max_prompt_bytes:
            raise RequestError(
                f"the prompt is {size} bytes; this server takes at most {self.max_prompt_bytes}", param="prompt"
            )

    def _check_fits_context(self, size: int) -> None:
        """Refuse a text of `size` bytes before paying to tokenize it when even at the longest token's bytes
        per token it would not fit the context."""
        at_least = -(-size // self.max_token_bytes)
        if at_least >= self.max_model_len:
            raise RequestError(
                f"the prompt is {size} bytes, so at least {at_least} tokens, but the model's context is "
                f"{self.max_model_len}; shorten it", param="prompt"
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

    def _params(self, request, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None,
                constraint=None) -> list:
        if max_tokens is not None and max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        if prompt_logprobs is not None and not getattr(self.llm.engine, "scores_prompts", False):
            raise RequestError("prompt logprobs (echo with logprobs, prompt_logprobs) are not supported on a model "
                               "split over several devices yet", param="prompt_logprobs" if request.prompt_logprobs
                               is not None else "echo", code="unsupported_parameter")
        if request.prompt_logprobs is not None and request.stream:  # echo with logprobs streams its scores
            raise RequestError("prompt_logprobs cannot be streamed; ask without stream", param="prompt_logprobs")
        for token in request.stop_token_ids or []:
            if not 0 <= token < self.vocab_size:
                raise RequestError(f"stop token id {token} is outside the vocabulary", param="stop_token_ids")
        try:
            params = sampling_params(request, max_tokens or self.max_model_len, logprobs, self.vocab_size,
                                     prompt_logprobs)
        except InvalidRequestError as exc:
            raise RequestError(str(exc)) from None
        return [dataclasses.replace(p, structured_outputs=constraint) for p in params] if constraint else params

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

    async def _collect(self, stream: RequestStream, num_choices: int, hide_output: bool = False) -> list[_Choice]:
        """Every completion's text, logprobs and finish; `hide_output` keeps only the prompt's side (max_tokens 0,
        run as one token that nobody sees)."""
        choices = [_Choice() for _ in range(num_choices)]
        try:
            async for delta in stream:
                choice = choices[delta.index]
                if delta.prompt_logprobs is not None:
                    choice.prompt_logprobs = delta.prompt_logprobs
                if hide_output:
                    if delta.finish_reason is not None:
                        choice.finish_reason = "length"
                    continue
                choice.text.append(delta.text)
                choice.num_tokens = delta.num_output_tokens
                if delta.logprobs:
                    choice.logprobs.extend(delta.logprobs)
                if delta.finish_reason is not None:
                    choice.finish_reason = delta.finish_reason
        except (EngineUnavailableError, GenerationError) as exc:
            raise request_error(exc) from None
        return choices

    def _events(self, request_id: str, stream: RequestStream, chunks: AsyncIterator[str]) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            try:
                try:
                    async for chunk in chunks:
                        yield chunk
                except (EngineUnavailableError, GenerationError) as exc:
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
        if req.max_tokens == 0 and not req.echo:
            raise RequestError("max_tokens must be at least 1 (0 is taken with echo: the prompt alone, scored with "
                               "logprobs)", param="max_tokens")
        # echo with logprobs scores the prompt too: every prompt token's logprob, the first null (OpenAI's legacy
        # completions, as evaluation harnesses ask for loglikelihoods); prompt_logprobs is vLLM's form of it.
        scored = [k for k in (req.logprobs if req.echo else None, req.prompt_logprobs) if k is not None]
        prompt_logprobs = max(scored) if scored else None
        hide_output = req.max_tokens == 0
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
        max_tokens = 16 if req.max_tokens is None else (1 if hide_output else req.max_tokens)
        explicit = req.max_tokens
        constraint, constraint_param = requested(req)
        params = self._params(req, max_tokens, req.logprobs, prompt_logprobs, constraint)

        size = sum(len(t.encode("utf-8")) for t, _ in prompts if t is not None)
        self._check_prompt_bytes(size)
        for text, _ in prompts:
            if text is not None:
                self._check_fits_context(len(text.encode("utf-8")))

        def prepare() -> _Prepared:
            if constraint is not None:
                compile_or_400(self.llm.engine.grammars, constraint, constraint_param)
            ready = []
            for text, ids in prompts:
                if ids is None:
                    ids = self.tokenizer.encode(text)
                self._check_ids(ids, explicit)
                if req.echo and text is None:
                    text = self.tokenizer.decode(ids)
                ready.append((text, ids))
            return _Prepared(ready, params)

        prepared = await self.tokenizer_pool.run(size, prepare)
        request_id, stream = self._submit("cmpl", prepared)
        created = int(time.time())
        if req.stream:
            chunks = self._completion_chunks(req, prepared, request_id, stream, created, n)
            return self._events(request_id, stream, chunks)
        work = partial(self._completion_response, req, prepared, request_id, stream, created, n)
        return await self._until_done(request, request_id, stream, work)

    async def _completion_response(self, req: CompletionRequest, prepared: _Prepared, request_id: str,
                                   stream: RequestStream, created: int, n: int) -> Response:
        collected = await self._collect(stream, len(prepared.prompts) * n, hide_output=req.max_tokens == 0)
        choices = []
        for index, choice in enumerate(collected):
            echo, ids = prepared.prompts[index // n]
            echo = (echo or "") if req.echo else ""
            logprobs = None
            if req.logprobs is not None:
                logprobs, _ = self.logprobs.completion(choice.logprobs, len(echo))
                if req.echo:
                    logprobs = self.logprobs.joined(self.logprobs.echo(ids, choice.prompt_logprobs), logprobs)
            body = {"index": index, "text": echo + "".join(choice.text), "logprobs": logprobs,
                    "finish_reason": choice.finish_reason}
            if req.prompt_logprobs is not None:
                body["prompt_logprobs"] = self.logprobs.vllm_prompt(choice.prompt_logprobs, req.prompt_logprobs)
            choices.append(body)
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
        # With logprobs the echoed prompt waits for its scores, which come with the completion's first delta.
        echo_scored = req.echo and req.logprobs is not None
        hide_output = req.max_tokens == 0
        if req.echo:
            for index in range(num_choices):
                offsets[index] = len(prepared.prompts[index // n][0] or "")
                if not echo_scored:
                    yield chunk(index, prepared.prompts[index // n][0] or "", None, None)
        async for delta in stream:
            if delta.prompt_logprobs is not None and echo_scored:
                text, ids = prepared.prompts[delta.index // n]
                yield chunk(delta.index, text or "", self.logprobs.echo(ids, delta.prompt_logprobs), None)
            if hide_output:
                if delta.finish_reason is not None:
                    yield chunk(delta.index, "", None, "length")
                continue
            tokens[delta.index] = delta.num_output_tokens
            logprobs = None
            if req.logprobs is not None:
                logprobs, offsets[delta.index] = self.logprobs.completion(delta.logprobs or [], offsets[delta.index])
            if delta.text or delta.finish_reason is not None or (logprobs and logprobs["tokens"]):
                yield chunk(delta.index, delta.text, logprobs, delta.finish_reason)
        if include_usage:
            usage = self._usage(sum(len(ids) for _, ids in prepared.prompts), sum(tokens))
            yield sse({**base, "choices": [], "usage": usage})

    # ---- /v1/chat/completions -------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        req = await parse(ChatCompletionRequest, await request.body())
        prepared, reader, request_id, stream = await self.start_chat(req)
        created = int(time.time())
        n = req.n or 1
        if req.stream:
            chunks = self._chat_chunks(req, prepared, stream, request_id, created, n, reader)
            return self._events(request_id, stream, chunks)
        work = partial(self._chat_response, req, prepared, request_id, stream, created, n, reader)
        return await self._until_done(request, request_id, stream, work)

    async def start_chat(self, req: ChatCompletionRequest, prefix: str = "chatcmpl"
                         ) -> tuple[_Prepared, ReplyReader | None, str, RequestStream]:
        """Check, render and tokenize a chat request and submit it: (what was submitted, how to read its reply,
        its request id, its stream). /v1/responses comes through here too, as the chat request it amounts to."""
        self.check_model(req.model)
        plan = plan_chat(req, self.tool_parser, self.reasoning_parser, self.tokenizer.token_to_id,
                         self.tokenizer.is_special)
        if req.top_logprobs is not None and not req.logprobs:
            raise RequestError("top_logprobs needs logprobs set to true", param="top_logprobs")
        chat = conversation(req.messages, req.tools, req.add_generation_prompt, req.continue_final_message,
                            req.chat_template_kwargs, req.documents)
        explicit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self._params(req, explicit, logprobs, req.prompt_logprobs, plan.constraint)
        reader = plan.reader
        if plan.keep_special_tokens:
            # The reader must see its markers; the end-of-sequence text they then bring is cut again.
            params = [dataclasses.replace(p, skip_special_tokens=False) for p in params]
            reader.stop_texts = tuple(self._token(t) for t in self.llm.engine.eos_token_ids)

        size = chat.text_bytes()
        self._check_prompt_bytes(size)

        def prepare() -> _Prepared:
            if plan.constraint is not None:
                compile_or_400(self.llm.engine.grammars, plan.constraint, plan.constraint_param)
            text = self.tokenizer.render_chat(chat.messages, chat.add_generation_prompt, **chat.render_options())
            self._check_fits_context(len(text.encode("utf-8")))  # the rendered text: a template may drop parts
            ids = self.tokenizer.encode(text, add_special_tokens=False)  # the template places BOS itself
            self._check_ids(ids, explicit)
            return _Prepared([(None, ids)], params)

        try:
            prepared = await self.tokenizer_pool.run(size, prepare)
        except TokenizerError as exc:
            raise RequestError(str(exc), param="messages") from None
        request_id, stream = self._submit(prefix, prepared)
        return prepared, reader, request_id, stream

    async def _chat_response(self, req: ChatCompletionRequest, prepared: _Prepared, request_id: str,
                             stream: RequestStream, created: int, n: int, reader: ReplyReader | None = None) -> Response:
        collected = await self._collect(stream, n)
        choices = []
        for index, choice in enumerate(collected):
            message: dict[str, Any] = {"role": "assistant", "content": "".join(choice.text)}
            finish = choice.finish_reason
            if reader is not None:
                message, finish = reader.message(message["content"], finish)
            choices.append({
                "index": index,
                "message": message,
                "logprobs": {"content": self.logprobs.chat(choice.logprobs)} if req.logprobs else None,
                "finish_reason": finish,
            })
        usage = self._usage(len(prepared.prompts[0][1]), sum(c.num_tokens for c in collected))
        body = {"id": request_id, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": choices, "usage": usage}
        if req.prompt_logprobs is not None:
            body["prompt_logprobs"] = self.logprobs.vllm_prompt(collected[0].prompt_logprobs, req.prompt_logprobs)
        return JSONResponse(body)

    async def _chat_chunks(self, req: ChatCompletionRequest, prepared: _Prepared, stream: RequestStream,
                           request_id: str, created: int, n: int,
                           reader: ReplyReader | None = None) -> AsyncIterator[str]:
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
        streams = [reader.stream() for _ in range(n)] if reader is not None else None
        async for delta in stream:
            tokens[delta.index] = delta.num_output_tokens
            logprobs = self.logprobs.chat(delta.logprobs or []) if req.logprobs else None
            finish = delta.finish_reason
            if streams is None:
                body = {"content": delta.text} if delta.text else {}
            else:
                body, finish = streams[delta.index].feed(delta.text, finish)
            if body or finish is not None or logprobs:
                yield chunk(delta.index, body, logprobs, finish)
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

