"""One chat request's tool calling: which parser reads the model's text, and how a reply, whole or
streamed, becomes OpenAI content plus `tool_calls` with finish_reason "tool_calls". With tool_choice "required" or
a named function the reply is constrained to the call (ForcedToolCalling), so it always parses."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from shoal.sampling_params import StructuredOutputsParams
from shoal.server.protocol import RequestError
from shoal.server.structured import closed_objects
from shoal.server.tool_parsers import PARSERS, Parsed, ToolCall


@dataclass
class ToolCalling:
    parser: str
    parallel: bool  # parallel_tool_calls: false keeps only a choice's first call

    def _kept(self, calls: list[ToolCall], made: int) -> list[ToolCall]:
        return calls if self.parallel else calls[: max(0, 1 - made)]

    def message(self, text: str, finish: str | None) -> tuple[dict[str, Any], str | None]:
        """A whole reply -> (its assistant message, its finish_reason)."""
        parsed = PARSERS[self.parser]().parse(text)
        calls = self._kept(parsed.tool_calls, 0)
        if not calls:
            return {"role": "assistant", "content": text}, finish
        content = parsed.content if parsed.content.strip() else None
        return {"role": "assistant", "content": content, "tool_calls": [c.openai() for c in calls]}, "tool_calls"

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self)


class ToolCallStream:
    """One choice's streamed reply: each piece of text -> the delta to send (content and tool-call deltas)."""

    def __init__(self, calling: ToolCalling) -> None:
        self.calling, self.parser, self.made = calling, PARSERS[calling.parser](), 0

    def feed(self, text: str, finish: str | None) -> tuple[dict[str, Any], str | None]:
        parsed = self.parser.feed(text)
        if finish is not None:
            parsed += self.parser.finish()
        delta = self._delta(parsed)
        return delta, ("tool_calls" if finish is not None and self.made else finish)

    def _delta(self, parsed: Parsed) -> dict[str, Any]:
        delta: dict[str, Any] = {"content": parsed.content} if parsed.content else {}
        calls = self.calling._kept(parsed.tool_calls, self.made)
        if calls:
            delta["tool_calls"] = [{"index": self.made + k, **c.openai()} for k, c in enumerate(calls)]
            self.made += len(calls)
        return delta


# ---- tool_choice "required" and a named function: the reply is constrained to the call itself ----------------
def forced_tool_calls(tools: list, tool_choice, parallel: bool) -> tuple[StructuredOutputsParams, ForcedToolCalling]:
    """tool_choice "required" or {"type": "function", "function": {"name": ...}} -> the JSON schema the reply is
    held to while sampling, and how that reply becomes tool_calls (vLLM's way: whatever the model's own
    format, the forced reply is plain JSON, so it always parses).

    A named function's reply is its arguments object; "required" is an array of {"name", "parameters"} (one item
    at most without parallel_tool_calls)."""
    functions = {t.function.name: t.function for t in tools}
    if tool_choice == "required":
        items = [{"type": "object", "properties": {"name": {"const": name}, "parameters": _parameters(f)},
                  "required": ["name", "parameters"], "additionalProperties": False} for name, f in functions.items()]
        schema = {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else {"anyOf": items}}
        if not parallel:
            schema["maxItems"] = 1
        return StructuredOutputsParams(json=schema), ForcedToolCalling(None)
    name = tool_choice.function.name
    if name not in functions:
        raise RequestError(f"tool_choice names the function {name!r}, which is not among the tools "
                           f"({', '.join(sorted(functions))}); name one of them", param="tool_choice")
    return StructuredOutputsParams(json=_parameters(functions[name])), ForcedToolCalling(name)


def _parameters(function) -> dict:
    """A function's parameters schema with its objects closed: a property the schema does not name is not
    generated (OpenAI's strict function calling asks for this of every schema; without it a sampled reply
    could invent keys until max_tokens)."""
    schema = function.parameters if function.parameters is not None else {"type": "object", "properties": {}}
    return closed_objects(schema)


def _item_call(item) -> ToolCall | None:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    return ToolCall(item["name"], json.dumps(item.get("parameters", {}), ensure_ascii=False))


@dataclass
class ForcedToolCalling:
    name: str | None  # the named function, or None for "required"

    def message(self, text: str, finish: str | None) -> tuple[dict[str, Any], str | None]:
        """A whole reply -> (its assistant message, its finish_reason). Cut short by max_tokens, a named call's
        arguments are incomplete and stay content; of "required"'s array, the calls that were whole are kept."""
        if self.name is not None:
            arguments = _loads(text)
            calls = [ToolCall(self.name, json.dumps(arguments, ensure_ascii=False)).openai()] if (
                finish != "length" and isinstance(arguments, dict)) else []
        else:
            delta, _ = ForcedToolCallStream(self).feed(text, None)
            calls = [{k: v for k, v in c.items() if k != "index"} for c in delta.get("tool_calls", [])]
        if not calls:
            return {"role": "assistant", "content": text}, finish
        return {"role": "assistant", "content": None, "tool_calls": calls}, "length" if finish == "length" else "tool_calls"

    def stream(self) -> ForcedToolCallStream:
        return ForcedToolCallStream(self)


class ForcedToolCallStream:
    """One choice's forced reply as OpenAI tool-call deltas: a named function's arguments as they arrive; for
    "required", each call of the array once its object closes."""

    def __init__(self, calling: ForcedToolCalling) -> None:
        self.name = calling.name
        self.call_id = ToolCall("", "").id
        self.made = 0
        self._depth, self._in_string, self._escaped, self._item = 0, False, False, ""

    def feed(self, text: str, finish: str | None) -> tuple[dict[str, Any], str | None]:
        if self.name is not None:
            delta: dict[str, Any] = {}
            if text or self.made == 0:
                call: dict[str, Any] = {"index": 0, "function": {"arguments": text}}
                if self.made == 0:
                    call = {"index": 0, "id": self.call_id, "type": "function",
                            "function": {"name": self.name, "arguments": text}}
                    self.made = 1
                delta = {"tool_calls": [call]}
            return delta, ("tool_calls" if finish == "stop" else finish)
        calls = []
        for char in text:
            if self._scan(char):
                call = _item_call(_loads(self._item))
                self._item = ""
                if call is not None:
                    calls.append({"index": self.made, **call.openai()})
                    self.made += 1
        delta = {"tool_calls": calls} if calls else {}
        return delta, ("tool_calls" if finish == "stop" and self.made else finish)

    def _scan(self, char: str) -> bool:
        """Follow the array one character at a time; True when `char` closes one of its objects."""
        if self._depth >= 2:
            self._item += char
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif char == "\\":
                self._escaped = True
            elif char == '"':
                self._in_string = False
            return False
        if char == '"':
            self._in_string = True
        elif char in "[{":
            self._depth += 1
            if self._depth == 2:
                self._item = char
        elif char in "]}":
            self._depth -= 1
            return self._depth == 1 and char == "}"
        return False


def _loads(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None
