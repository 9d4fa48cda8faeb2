"""POST /v1/responses: OpenAI's Responses API, the part of it one served model can answer. `input` (a string,
or a list of messages, function_call and function_call_output items), `instructions`, `max_output_tokens`,
`temperature`, `top_p`, `text.format` (text, json_object, json_schema), function `tools` with `tool_choice`
and `parallel_tool_calls`, and `stream` with the Responses event types.

A request is turned into the chat request it amounts to (instructions as the system message, function calls
as an assistant turn's tool_calls, their outputs as tool messages) and runs through the chat path
(OpenAIServing.start_chat): the same template, tool-call and reasoning parsers, grammar and bounds. The reply
becomes output items: reasoning (with a reasoning parser), function calls, one assistant message. Nothing is
stored, so `previous_response_id` and background mode are refused with a 400 that says what to send instead.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from shoal.server.protocol import (
    MAX_MESSAGES,
    MAX_TOOLS,
    MAX_TOKENS_FIELD,
    ChatCompletionRequest,
    RequestError,
    ShortStr,
    _Strict,
)


class InputText(_Strict):
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputMessage(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | Annotated[list[InputText], Field(max_length=MAX_MESSAGES)]


class FunctionCallItem(_Strict):
    type: Literal["function_call"]
    call_id: ShortStr
    name: ShortStr
    arguments: str
    id: ShortStr | None = None
    status: ShortStr | None = None


class FunctionCallOutput(_Strict):
    type: Literal["function_call_output"]
    call_id: ShortStr
    output: str
    id: ShortStr | None = None
    status: ShortStr | None = None


def _item_type(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("type", "message")
    return getattr(value, "type", None)


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutput, Tag("function_call_output")],
    Discriminator(_item_type),
]


class FunctionTool(_Strict):
    type: Literal["function"]
    name: ShortStr
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class TextFormat(_Strict):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False, populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: ShortStr | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(_Strict):
    format: TextFormat | None = None


class NamedFunctionChoice(_Strict):
    type: Literal["function"]
    name: ShortStr


class ResponsesRequest(_Strict):
    model: ShortStr | None = None
    # A string is one user message (read so before validation: as one branch of a union, a bad item list would
    # be reported against the string branch, naming no item).
    input: Annotated[list[InputItem], Field(min_length=1, max_length=MAX_MESSAGES)]
    instructions: str | None = None
    max_output_tokens: Annotated[int | None, Field(ge=1, le=MAX_TOKENS_FIELD)] = None
    temperature: Annotated[float | None, Field(ge=0.0, le=2.0)] = None
    top_p: Annotated[float | None, Field(gt=0.0, le=1.0)] = None
    stream: bool = False
    text: TextConfig | None = None
    tools: Annotated[list[FunctionTool] | None, Field(max_length=MAX_TOOLS)] = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    background: bool | None = None
    previous_response_id: ShortStr | None = None
    metadata: Annotated[dict[str, ShortStr] | None, Field(max_length=16)] = None
    user: ShortStr | None = None

    @model_validator(mode="before")
    @classmethod
    def _string_input(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("input"), str):
            return {**data, "input": [{"type": "message", "role": "user", "content": data["input"]}]}
        return data


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def chat_messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The conversation in chat form: instructions first, function calls folded into assistant turns."""
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    for item in req.input:
        if isinstance(item, InputMessage):
            content = item.content if isinstance(item.content, str) else "".join(p.text for p in item.content)
            messages.append({"role": "system" if item.role == "developer" else item.role, "content": content})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)  # the turn that made the call, or its other calls
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
    return messages


def chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    if req.previous_response_id is not None:
        raise RequestError("this server stores no responses, so previous_response_id cannot be followed; send the "
                           "whole conversation in input", param="previous_response_id", code="unsupported_parameter")
    if req.background:
        raise RequestError("background responses are not supported (nothing is stored); leave background out",
                           param="background", code="unsupported_parameter")
    body: dict[str, Any] = {"model": req.model, "messages": chat_messages(req), "stream": req.stream}
    for ours, theirs in (("max_output_tokens", "max_completion_tokens"), ("temperature", "temperature"),
                         ("top_p", "top_p"), ("parallel_tool_calls", "parallel_tool_calls")):
        if getattr(req, ours) is not None:
            body[theirs] = getattr(req, ours)
    if req.tools:
        body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                         for t in req.tools]
    if isinstance(req.tool_choice, NamedFunctionChoice):
        body["tool_choice"] = {"type": "function", "function": {"name": req.tool_choice.name}}
    elif req.tool_choice is not None:
        body["tool_choice"] = req.tool_choice
    text_format = req.text.format if req.text is not None else None
    if text_format is not None and text_format.type == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": text_format.model_dump(
            by_alias=True, exclude={"type"}, exclude_none=True)}
    elif text_format is not None:
        body["response_format"] = {"type": text_format.type}
    try:
        return ChatCompletionRequest.model_validate_json(json.dumps(body))
    except ValidationError as exc:  # a tool or schema the chat path refuses: name the Responses field
        first = exc.errors(include_url=False)[0]
        field = {"messages": "input", "response_format": "text", "max_completion_tokens": "max_output_tokens"}.get(
            str(first["loc"][0]), str(first["loc"][0]))
        raise RequestError(f"{field}: {first['msg']}", param=field) from None


class ResponsesServing:
    def __init__(self, serving) -> None:
        self.serving = serving  # the OpenAIServing whose chat path answers

    async def create(self, request: Request) -> Response:
        from shoal.server.serving import parse

        req = await parse(ResponsesRequest, await request.body())
        chat = chat_request(req)
        prepared, reader, request_id, stream = await self.serving.start_chat(chat, prefix="resp")
        response_id = request_id
        shell = self._shell(req, response_id, chat)
        prompt_tokens = len(prepared.prompts[0][1])
        if req.stream:
            events = _Events(shell, reader, stream, prompt_tokens)
            return self.serving._events(request_id, stream, events.run())

        async def work() -> Response:
            choice = (await self.serving._collect(stream, 1))[0]
            text = "".join(choice.text)
            message, finish = reader.message(text, choice.finish_reason) if reader is not None else (
                {"role": "assistant", "content": text}, choice.finish_reason)
            output = _output_items(message)
            return JSONResponse(_finished(shell, output, finish, prompt_tokens, choice.num_tokens))

        return await self.serving._until_done(request, request_id, stream, work)

    def _shell(self, req: ResponsesRequest, response_id: str, chat: ChatCompletionRequest) -> dict[str, Any]:
        """The response object's fields that do not depend on the reply."""
        text_format = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format \
            else {"type": "text"}
        tool_choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, NamedFunctionChoice) \
            else req.tool_choice or "auto"
        return {"id": response_id, "object": "response", "created_at": int(time.time()), "status": "in_progress",
                "error": None, "incomplete_details": None, "instructions": req.instructions,
                "max_output_tokens": req.max_output_tokens, "model": self.serving.model_name, "output": [],
                "parallel_tool_calls": req.parallel_tool_calls is not False, "previous_response_id": None,
                "reasoning": None, "store": False, "temperature": req.temperature, "text": {"format": text_format},
                "tool_choice": tool_choice, "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
                "top_p": req.top_p, "truncation": "disabled", "usage": None, "user": req.user,
                "metadata": req.metadata or {}}


def _usage(prompt_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + output_tokens}


def _finished(shell: dict[str, Any], output: list[dict], finish: str | None, prompt_tokens: int,
              output_tokens: int) -> dict[str, Any]:
    cut = finish == "length"
    return {**shell, "status": "incomplete" if cut else "completed", "output": output,
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "usage": _usage(prompt_tokens, output_tokens)}


def _reasoning_item(text: str, item_id: str | None = None) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id or _new_id("rs"), "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "status": "completed"}


def _message_item(text: str, item_id: str | None = None, status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": item_id or _new_id("msg"), "status": status, "role": "assistant",
            "content": [_text_part(text)] if status == "completed" else []}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call_item(call_id: str, name: str, arguments: str, item_id: str | None = None,
               status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": item_id or _new_id("fc"), "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def _output_items(message: dict[str, Any]) -> list[dict[str, Any]]:
    """A chat reply's assistant message as Responses output items: reasoning, function calls, the message."""
    output = []
    if message.get("reasoning_content"):
        output.append(_reasoning_item(message["reasoning_content"]))
    for call in message.get("tool_calls") or []:
        output.append(_call_item(call["id"], call["function"]["name"], call["function"]["arguments"]))
    if message.get("content"):
        output.append(_message_item(message["content"]))
    return output


class _Events:
    """One streamed response: the chat reply's deltas as Responses events, each item opened when its first
    text arrives and closed when another kind begins or the reply ends."""

    def __init__(self, shell: dict[str, Any], reader, stream, prompt_tokens: int) -> None:
        self.shell, self.reader, self.stream, self.prompt_tokens = shell, reader, stream, prompt_tokens
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the item being streamed: its kind, index, id and text so far
        self.blank = ""  # whitespace before a message begins: a message only if text follows (as unstreamed)

    def _event(self, kind: str, **fields) -> str:
        from shoal.server.serving import sse

        self.sequence += 1
        return sse({"type": kind, "sequence_number": self.sequence - 1, **fields})

    def _close(self) -> list[str]:
        item, self.open = self.open, None
        if item is None:
            return []
        index, item_id, text = item["index"], item["id"], "".join(item["text"])
        if item["kind"] == "message":
            done = _message_item(text, item_id)
            self.output[index] = done
            return [self._event("response.output_text.done", item_id=item_id, output_index=index, content_index=0,
                                text=text, logprobs=[]),
                    self._event("response.content_part.done", item_id=item_id, output_index=index, content_index=0,
                                part=_text_part(text)),
                    self._event("response.output_item.done", output_index=index, item=done)]
        if item["kind"] == "reasoning":
            done = _reasoning_item(text, item_id)
            self.output[index] = done
            return [self._event("response.reasoning_text.done", item_id=item_id, output_index=index,
                                content_index=0, text=text),
                    self._event("response.output_item.done", output_index=index, item=done)]
        done = _call_item(item["call_id"], item["name"], text, item_id)
        self.output[index] = done
        return [self._event("response.function_call_arguments.done", item_id=item_id, output_index=index,
                            arguments=text, name=item["name"]),
                self._event("response.output_item.done", output_index=index, item=done)]

    def _begin(self, kind: str, item: dict[str, Any], **extra) -> list[str]:
        events = self._close()
        index = len(self.output)
        self.output.append(item)
        self.open = {"kind": kind, "index": index, "id": item["id"], "text": [], **extra}
        events.append(self._event("response.output_item.added", output_index=index, item=item))
        if kind == "message":
            events.append(self._event("response.content_part.added", item_id=item["id"], output_index=index,
                                      content_index=0, part=_text_part("")))
        return events

    def _text(self, kind: str, text: str) -> list[str]:
        events = []
        if kind == "message" and (self.open is None or self.open["kind"] != kind):
            if not (self.blank + text).strip():
                self.blank += text
                return events
            text, self.blank = self.blank + text, ""
        if self.open is None or self.open["kind"] != kind:
            item = _message_item("", status="in_progress") if kind == "message" else \
                {**_reasoning_item(""), "content": [], "status": "in_progress"}
            events += self._begin(kind, item)
        self.open["text"].append(text)
        name = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        extra = {"logprobs": []} if kind == "message" else {}
        events.append(self._event(name, item_id=self.open["id"], output_index=self.open["index"], content_index=0,
                                  delta=text, **extra))
        return events

    def _call(self, delta: dict[str, Any]) -> list[str]:
        events = []
        if "id" in delta:  # a new call begins
            name = delta["function"]["name"]
            item = _call_item(delta["id"], name, "", status="in_progress")
            events += self._begin("call", item, call_id=delta["id"], name=name)
        arguments = delta.get("function", {}).get("arguments") or ""
        if arguments and self.open is not None and self.open["kind"] == "call":
            self.open["text"].append(arguments)
            events.append(self._event("response.function_call_arguments.delta", item_id=self.open["id"],
                                      output_index=self.open["index"], delta=arguments))
        return events

    async def run(self) -> AsyncIterator[str]:
        yield self._event("response.created", response=self.shell)
        yield self._event("response.in_progress", response=self.shell)
        reply = self.reader.stream() if self.reader is not None else None
        finish, tokens = None, 0
        async for delta in self.stream:
            tokens = delta.num_output_tokens
            if reply is None:
                body, finish = ({"content": delta.text} if delta.text else {}), delta.finish_reason
            else:
                body, finish = reply.feed(delta.text, delta.finish_reason)
            events = []
            if body.get("reasoning_content"):
                events += self._text("reasoning", body["reasoning_content"])
            for call in body.get("tool_calls") or []:
                events += self._call(call)
            if body.get("content"):
                events += self._text("message", body["content"])
            for event in events:
                yield event
        for event in self._close():
            yield event
        final = _finished(self.shell, self.output, finish, self.prompt_tokens, tokens)
        yield self._event("response.incomplete" if final["status"] == "incomplete" else "response.completed",
                          response=final)
