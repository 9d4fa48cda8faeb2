"""Forced tool calls (tool_choice "required" or a named function): the constraint each one puts on the reply,
and the reply read back as tool calls, whole and streamed in chunks of every size from 1 character up."""

from __future__ import annotations

import json

import pytest

from shoal.server.protocol import NamedToolChoice, RequestError, Tool
from shoal.server.tool_calls import ForcedToolCalling, forced_tool_calls

TOOLS = [Tool.model_validate({"type": "function", "function": {"name": "get_weather", "parameters": {
             "type": "object", "properties": {"city": {"type": "string"}, "where": {"type": "object", "properties": {
                 "lat": {"type": "number"}}}}, "required": ["city"]}}}),
         Tool.model_validate({"type": "function", "function": {"name": "get_time"}})]
NAMED = NamedToolChoice.model_validate({"type": "function", "function": {"name": "get_weather"}})
ARRAY = ('[{"name":"get_weather","parameters":{"city":"Paris \\"}{[","where":{"lat":48.8}}},'
         '{"name":"get_time","parameters":{}}]')


def test_the_constraints_close_every_object_and_bound_the_array():
    spec, calling = forced_tool_calls(TOOLS, "required", parallel=False)
    schema = spec.json
    assert calling.name is None and schema["minItems"] == 1 and schema["maxItems"] == 1
    weather, time = schema["items"]["anyOf"]
    assert weather["properties"]["name"] == {"const": "get_weather"}
    parameters = weather["properties"]["parameters"]
    assert parameters["additionalProperties"] is False
    assert parameters["properties"]["where"]["additionalProperties"] is False
    assert time["properties"]["parameters"] == {"type": "object", "properties": {}, "additionalProperties": False}
    assert "maxItems" not in forced_tool_calls(TOOLS, "required", parallel=True)[0].json
    spec, calling = forced_tool_calls(TOOLS, NAMED, parallel=True)
    assert calling.name == "get_weather" and spec.json["required"] == ["city"]
    with pytest.raises(RequestError, match="not among the tools"):
        forced_tool_calls(TOOLS, NamedToolChoice.model_validate({"type": "function", "function": {"name": "x"}}),
                          parallel=True)


def streamed(calling: ForcedToolCalling, text: str, size: int) -> tuple[list[tuple[str, dict]], str | None]:
    stream, calls, finish = calling.stream(), {}, None
    pieces = [text[at : at + size] for at in range(0, len(text), size)]
    for k, piece in enumerate(pieces):
        delta, finish = stream.feed(piece, "stop" if k == len(pieces) - 1 else None)
        for call in delta.get("tool_calls", []):
            entry = calls.setdefault(call["index"], {"name": "", "arguments": ""})
            entry["name"] += call.get("function", {}).get("name", "")
            entry["arguments"] += call["function"]["arguments"]
            assert "id" in call or entry["name"]  # the first delta of a call carries its id
    return [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())], finish


def test_required_reply_whole_and_at_every_chunk_size():
    expected = [("get_weather", {"city": 'Paris "}{[', "where": {"lat": 48.8}}), ("get_time", {})]
    message, finish = ForcedToolCalling(None).message(ARRAY, "stop")
    assert finish == "tool_calls" and message["content"] is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == expected
    for size in range(1, len(ARRAY) + 1):
        assert streamed(ForcedToolCalling(None), ARRAY, size) == (expected, "tool_calls"), size
    cut = ARRAY[: ARRAY.index('{"name":"get_time"') + 10]  # max_tokens cut the second call
    message, finish = ForcedToolCalling(None).message(cut, "length")
    assert finish == "length" and [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]


def test_named_reply_whole_and_at_every_chunk_size():
    arguments = '{"city":"Oslo","where":{"lat":59.9}}'
    message, finish = ForcedToolCalling("get_weather").message(arguments, "stop")
    assert finish == "tool_calls" and json.loads(message["tool_calls"][0]["function"]["arguments"]) == json.loads(
        arguments)
    for size in range(1, len(arguments) + 1):
        assert streamed(ForcedToolCalling("get_weather"), arguments, size) == (
            [("get_weather", json.loads(arguments))], "tool_calls"), size
    message, finish = ForcedToolCalling("get_weather").message(arguments[:9], "length")
    assert finish == "length" and message == {"role": "assistant", "content": arguments[:9]}
