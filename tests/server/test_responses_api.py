"""POST /v1/responses through the official openai client's `client.responses.create`: a string or item-list
input with instructions renders as the chat it amounts to (the same prompt tokens as /tokenize of those
messages, the same greedy reply as /v1/chat/completions), text.format json_schema replies validate, a required
function tool always gives a parsed function_call item, function_call / function_call_output items reach the
template as tool_calls and tool messages, streams carry the Responses event types in order and add up to the
final response, reasoning and tool calls split into their items, and bad requests are 400s naming their field."""

from __future__ import annotations

import json

import openai
import pytest
from chat_checkpoints import long_context_checkpoint
from jsonschema import validate
from scripted_engine import script_engine
from server_harness import MODEL

from shoal import LLM

ANSWER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "degrees": {"type": "integer"}},
          "required": ["city", "degrees"], "additionalProperties": False}
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                          "required": ["city"], "additionalProperties": False}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return long_context_checkpoint(tmp_path_factory, "chatml_tools")


@pytest.fixture(scope="module")
def server(serve, folder):
    return serve(LLM(str(folder), dtype="float32", progress=False))


@pytest.fixture(scope="module")
def thinking_server(serve, folder):
    return serve(LLM(str(folder), dtype="float32", progress=False), reasoning_parser="qwen3")


def prompt_tokens(server, messages, tools=None) -> int:
    body = {"model": MODEL, "messages": messages, **({"tools": tools} if tools else {})}
    return server.post("/tokenize", json=body).json()["count"]


def test_input_and_instructions_answer_as_the_chat_they_amount_to(server):
    client = server.client()
    out = client.responses.create(model=MODEL, input="Weather in Paris?", instructions="Be terse.",
                                  max_output_tokens=6, temperature=0)
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Weather in Paris?"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    assert out.object == "response" and out.id.startswith("resp")
    assert out.output_text == chat.choices[0].message.content
    assert out.usage.input_tokens == prompt_tokens(server, messages) == chat.usage.prompt_tokens
    assert out.usage.output_tokens == chat.usage.completion_tokens
    if chat.choices[0].finish_reason == "length":
        assert out.status == "incomplete" and out.incomplete_details.reason == "max_output_tokens"
    else:
        assert out.status == "completed"
    listed = client.responses.create(model=MODEL, max_output_tokens=6, temperature=0, input=[
        {"role": "developer", "content": "Be terse."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]}])
    assert listed.output_text == out.output_text and listed.usage.input_tokens == out.usage.input_tokens


def test_json_schema_text_format_validates(server):
    client = server.client()
    for seed in range(3):
        out = client.responses.create(model=MODEL, input="Weather as JSON", temperature=1, max_output_tokens=60,
                                      text={"format": {"type": "json_schema", "name": "answer", "schema": ANSWER,
                                                       "strict": True}}, extra_body={"seed": seed})
        assert out.status == "completed"
        validate(json.loads(out.output_text), ANSWER)
        assert out.text.format.type == "json_schema"


def test_a_required_function_tool_gives_a_function_call_item_and_its_output_goes_back(server):
    client = server.client()
    out = client.responses.create(model=MODEL, input="Weather in Oslo?", tools=[WEATHER], tool_choice="required",
                                  max_output_tokens=80, temperature=1)
    calls = [item for item in out.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and calls[0].status == "completed"
    validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    follow = [{"role": "user", "content": "Weather in Oslo?"},
              {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather",
               "arguments": calls[0].arguments},
              {"type": "function_call_output", "call_id": calls[0].call_id, "output": "3 C"}]
    again = client.responses.create(model=MODEL, input=follow, tools=[WEATHER], tool_choice="none",
                                    max_output_tokens=2)
    chat_messages = [follow[0], {"role": "assistant", "content": None, "tool_calls": [
        {"id": calls[0].call_id, "type": "function", "function": {"name": "get_weather",
                                                                   "arguments": calls[0].arguments}}]},
        {"role": "tool", "tool_call_id": calls[0].call_id, "content": "3 C"}]
    tools = [{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}]
    assert again.usage.input_tokens == prompt_tokens(server, chat_messages, tools)


def _stream(client, **request) -> list:
    return list(client.responses.create(model=MODEL, stream=True, **request))


def test_streamed_text_and_function_calls_carry_the_responses_events(server):
    client = server.client()
    events = _stream(client, input="Weather in Paris?", max_output_tokens=8, temperature=0)
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          events[-1].type] and events[-1].type in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    whole = client.responses.create(model=MODEL, input="Weather in Paris?", max_output_tokens=8, temperature=0)
    assert text == final.output_text == whole.output_text

    events = _stream(client, input="Weather in Oslo?", tools=[WEATHER], tool_choice={"type": "function",
                     "name": "get_weather"}, max_output_tokens=80, temperature=1)
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done and done[0].arguments == arguments
    validate(json.loads(arguments), WEATHER["parameters"])
    assert events[-1].response.output[0].type == "function_call"


def test_reasoning_and_an_auto_tool_call_become_their_items(thinking_server, monkeypatch):
    script_engine(thinking_server, monkeypatch, '<think>Look it up.</think>\n<tool_call>\n{"name": "get_weather", '
                  '"arguments": {"city": "Paris"}}\n</tool_call></s>')
    client = thinking_server.client()
    out = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER])
    assert [item.type for item in out.output] == ["reasoning", "function_call"]
    assert out.output[0].content[0].text == "Look it up."
    assert (out.output[1].name, json.loads(out.output[1].arguments)) == ("get_weather", {"city": "Paris"})
    events = _stream(client, input="Weather in Paris?", tools=[WEATHER])
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert reasoning == "Look it up."
    assert [i.type for i in events[-1].response.output] == ["reasoning", "function_call"]


@pytest.mark.parametrize("body, param, words", [
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id", "send the whole conversation"),
    ({"input": []}, "input", "at least 1 item"),
    ({"input": [{"role": "narrator", "content": "x"}]}, "input", "'user', 'system', 'developer' or 'assistant'"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens", "greater than or equal to 1"),
    ({"input": "x", "temperature": 3}, "temperature", "less than or equal to 2"),
    ({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice", "nope"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "a"}}}, "response_format", "schema"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input", "call_id"),
])
def test_bad_responses_requests_are_400s_naming_their_field(server, body, param, words):
    response = server.post("/v1/responses", json={"model": MODEL, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
    with pytest.raises(openai.BadRequestError):
        server.client().responses.create(model=MODEL, **body)
