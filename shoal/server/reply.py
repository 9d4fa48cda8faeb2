"""How one chat request's reply is read before it is sent: reasoning split off into `reasoning_content`
(shoal.server.reasoning), then tool calls parsed from what is left (shoal.server.tool_calls), whole or as
streamed deltas. A constraint (structured outputs, a forced tool call) on a reply that starts in its reasoning
waits for the reasoning's end marker, so it holds the answer and never the thinking.

Markers that the tokenizer calls special (a tool-call or think tag) would be skipped when the reply is
decoded, so the server keeps special tokens for such a reply; the end-of-sequence text that then comes
with a stopped reply is cut again here (`stop_texts`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from shoal.sampling_params import StructuredOutputsParams
from shoal.server.protocol import ChatCompletionRequest, NamedToolChoice, RequestError
from shoal.server.reasoning import END, ReasoningParser, reasoning_parser, thinks
from shoal.server.structured import requested
from shoal.server.tool_calls import ForcedToolCalling, ToolCalling, forced_tool_calls
from shoal.server.tool_parsers import PARSERS

Tools = ToolCalling | ForcedToolCalling


def markers_are_special(markers: Iterable[str], token_to_id: Callable[[str], int | None],
                        is_special: Callable[[int], bool]) -> bool:
    ids = [token_to_id(m) for m in markers]
    return any(i is not None and is_special(i) for i in ids)


@dataclass
class ChatPlan:
    """What a chat request asks of its reply: how to read it, and what constrains it while sampling."""

    reader: ReplyReader | None  # None: the reply is plain content
    constraint: StructuredOutputsParams | None
    constraint_param: str | None  # the request field that set the constraint (named in a 400)
    keep_special_tokens: bool  # a marker the reader needs is a special token


def plan_chat(req: ChatCompletionRequest, tool_parser: str | None, reasoning: str | None,
              token_to_id: Callable[[str], int | None], is_special: Callable[[int], bool]) -> ChatPlan:
    """Check the request's tools, tool_choice and structured-output fields against each other and the server."""
    forced = req.tool_choice == "required" or isinstance(req.tool_choice, NamedToolChoice)
    if req.tool_choice is not None and req.tool_choice != "none" and not req.tools:
        raise RequestError("tool_choice needs tools", param="tool_choice")
    constraint, param = requested(req)
    tools: Tools | None = None
    markers: list[str] = []
    if forced:
        if constraint is not None:
            raise RequestError(f"{param} cannot be combined with tool_choice {_choice_name(req)}: the reply is the "
                               "tool call", param=param)
        constraint, tools = forced_tool_calls(req.tools, req.tool_choice, req.parallel_tool_calls is not False)
        param = "tools"
    elif req.tools and req.tool_choice != "none":
        if tool_parser is None:
            raise RequestError("this model's chat template shows no tool-call format shoal can read; start the "
                               "server with --tool-call-parser, or send tool_choice none (or required, or a named "
                               "function: those need no parser)", param="tools", code="unsupported_parameter")
        tools = ToolCalling(tool_parser, req.parallel_tool_calls is not False)
        markers += PARSERS[tool_parser].markers
    if constraint is not None and reasoning and thinks(reasoning, req.chat_template_kwargs):
        # The model thinks first, freely; the constraint holds what follows its reasoning (as vLLM does).
        constraint = replace(constraint, start_after=END)
    if reasoning:
        markers += ReasoningParser.markers
    reader = ReplyReader(tools, reasoning, req.chat_template_kwargs) if tools is not None or reasoning else None
    keep = bool(reader) and req.skip_special_tokens is None and markers_are_special(markers, token_to_id, is_special)
    return ChatPlan(reader, constraint, param, keep)


def _choice_name(req: ChatCompletionRequest) -> str:
    return "required" if req.tool_choice == "required" else "naming a function"


@dataclass
class ReplyReader:
    tools: Tools | None = None
    reasoning: str | None = None  # the reasoning parser's name, or None
    template_kwargs: dict[str, Any] | None = None  # the request's chat_template_kwargs (thinking on or off)
    stop_texts: tuple[str, ...] = ()  # with special tokens kept: end-of-sequence texts cut from a stopped reply

    def _reasoning(self) -> ReasoningParser | None:
        return reasoning_parser(self.reasoning, self.template_kwargs) if self.reasoning else None

    def _cut_stop(self, text: str, finish: str | None) -> str:
        if finish == "stop":
            for end in self.stop_texts:
                if end and text.endswith(end):
                    return text[: -len(end)]
        return text

    def message(self, text: str, finish: str | None) -> tuple[dict[str, Any], str | None]:
        """A whole reply -> (its assistant message, its finish_reason)."""
        text = self._cut_stop(text, finish)
        parser = self._reasoning()
        reasoning = None
        if parser is not None:
            reasoning, text = parser.split(text)
            text = text or ""
        if self.tools is not None:
            message, finish = self.tools.message(text, finish)
        else:
            message = {"role": "assistant", "content": text}
        if parser is not None:
            message["reasoning_content"] = reasoning
            if message.get("content") == "":
                message["content"] = None
        return message, finish

    def stream(self) -> ReplyStream:
        return ReplyStream(self)


class ReplyStream:
    """One choice's streamed reply: each piece of text -> the delta to send."""

    def __init__(self, reader: ReplyReader) -> None:
        self.reader = reader
        self.reasoning = reader._reasoning()
        self.tools = reader.tools.stream() if reader.tools is not None else None

    def feed(self, text: str, finish: str | None) -> tuple[dict[str, Any], str | None]:
        text = self.reader._cut_stop(text, finish)  # the stop token came with the last piece
        delta: dict[str, Any] = {}
        if self.reasoning is not None:
            reasoning, text = self.reasoning.feed(text)
            if finish is not None:
                more_reasoning, more_content = self.reasoning.finish()
                reasoning, text = reasoning + more_reasoning, text + more_content
            if reasoning:
                delta["reasoning_content"] = reasoning
        if self.tools is not None:
            body, finish = self.tools.feed(text, finish)
            delta.update(body)
        elif text:
            delta["content"] = text
        return delta, finish
