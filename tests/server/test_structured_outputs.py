"""Structured outputs and forced tool calls through `shoal serve`'s app with the official openai client and the
demo model: response_format json_schema / json_object and vLLM's guided fields hold every sampled reply to its
constraint; tool_choice required and named always give calls that parse; every bad constraint is a 400."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from server_harness import MODEL

from shoal import LLM

jsonschema = pytest.importorskip("jsonschema")

# Bounded strings and numbers: a sampled reply must finish inside max_tokens, or it cannot be whole JSON.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z ]{1,10}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "legs": {"type": "integer",
                "minimum": 0, "maximum": 4}}, "required": ["kind"], "additionalProperties": False},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "pet", "ok"],
    "additionalProperties": False,
}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Za-z]{1,10}$"},
                                            "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time"}}]
ASK = [{"role": "user", "content": "Tell me about a person."}]


@pytest.fixture(scope="module")
def server(serve):
    return serve(LLM(progress=False, max_num_seqs=64))


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def test_json_schema_replies_validate_50_of_50_at_temperature_1(client):
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

    def ask(seed: int):
        return client.chat.completions.create(model=MODEL, messages=ASK, temperature=1.0, n=10, seed=seed,
                                              max_tokens=96, response_format=response_format)

    with ThreadPoolExecutor(5) as pool:  # 50 replies sampled side by side, in one batch
        replies = [c for out in pool.map(ask, range(5)) for c in out.choices]
    assert len(replies) == 50
    for choice in replies:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    assert len({c.message.content for c in replies}) > 10  # sampled, not one reply repeated


def test_json_object_and_a_streamed_schema_reply(client):
    out = client.chat.completions.create(model=MODEL, messages=ASK, temperature=1.0, n=4, seed=1, max_tokens=64,
                                         response_format={"type": "json_object"})
    for choice in out.choices:
        if choice.finish_reason == "stop":  # any object: a sampled one may run past max_tokens
            assert isinstance(json.loads(choice.message.content), dict)
        else:
            assert choice.message.content.startswith("{")
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=ASK, temperature=1.0, seed=2, max_tokens=96, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    jsonschema.validate(json.loads(text), PERSON)
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]


def test_vllm_guided_fields_on_completions_and_chat(client):
    choice = client.completions.create(model=MODEL, prompt="Colour:", max_tokens=8, temperature=1.0, n=4, seed=3,
                                       extra_body={"guided_choice": ["red", "green", "blue"]})
    assert {c.text for c in choice.choices} <= {"red", "green", "blue"}
    regex = client.completions.create(model=MODEL, prompt="Date:", max_tokens=16, temperature=1.0, n=4, seed=4,
                                      extra_body={"guided_regex": r"20[0-9]{2}-[01][0-9]"})
    assert all(re.fullmatch(r"20[0-9]{2}-[01][0-9]", c.text) for c in regex.choices)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    for body in ({"structured_outputs": {"json": schema}}, {"guided_json": schema}):
        out = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=16, temperature=1.0, seed=5,
                                             extra_body=body)
        jsonschema.validate(json.loads(out.choices[0].message.content), schema)
    grammar = 'start: "x" ("+" "x")*\n'
    out = client.completions.create(model=MODEL, prompt="Sum:", max_tokens=6, temperature=1.0, seed=6,
                                    extra_body={"guided_grammar": grammar})
    assert re.fullmatch(r"x(\+x)*", out.choices[0].text)


def calls_of(choice) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]


def check_call(name: str, arguments: dict) -> None:
    assert name in {"get_weather", "get_time"}
    jsonschema.validate(arguments, WEATHER if name == "get_weather" else {"type": "object", "maxProperties": 0})


def test_tool_choice_required_and_named_always_parse(client):
    single = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=False, temperature=1.0, n=8, seed=8, max_tokens=96)
    for choice in single.choices:  # one call of bounded arguments: always whole within max_tokens
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [(name, arguments)] = calls_of(choice)
        check_call(name, arguments)
    # Parallel calls: an open array, which a sampled reply may run on until max_tokens cuts it; the calls that
    # were whole by then still come back, each valid.
    parallel = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                              temperature=1.0, n=8, seed=7, max_tokens=48)
    for choice in parallel.choices:
        assert choice.finish_reason in {"tool_calls", "length"}
        if choice.message.tool_calls:
            for name, arguments in calls_of(choice):
                check_call(name, arguments)
        else:
            assert choice.finish_reason == "length" and choice.message.content.startswith("[")
    named = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, temperature=1.0, n=8, seed=9, max_tokens=64,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    for choice in named.choices:
        assert choice.finish_reason == "tool_calls"
        [(name, arguments)] = calls_of(choice)
        assert name == "get_weather"
        jsonschema.validate(arguments, WEATHER)


def streamed_calls(chunks) -> dict[int, dict]:
    calls: dict[int, dict] = {}
    for c in chunks:
        for call in c.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"id": call.id, "name": "", "arguments": ""})
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
    return calls


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_stream_as_deltas(client, tool_choice):
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=tool_choice,
                                                 parallel_tool_calls=False, temperature=1.0, seed=10, max_tokens=96,
                                                 stream=True))
    calls = streamed_calls(chunks)
    assert calls and all(entry["id"] for entry in calls.values())
    for entry in calls.values():
        arguments = json.loads(entry["arguments"])
        if entry["name"] == "get_weather":
            jsonschema.validate(arguments, WEATHER)
        else:
            assert entry["name"] == "get_time" and arguments == {}
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format", "JSON schema cannot be compiled"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format",
     "needs json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format", "json_object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {f"k{i}": {"description": "d" * 100} for i in range(700)}}}}},
     "response_format", "at most 65536"),
    ({"guided_regex": "(unclosed"}, "guided_regex", "regex cannot be compiled"),
    ({"guided_grammar": "start: missing_rule"}, "guided_grammar", "grammar cannot be compiled"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "give only one"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "not among the tools"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
     "cannot be combined"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "tools", "cannot be compiled"),
])
def test_bad_constraints_are_400s_that_name_their_field(client, body, param, words):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, extra_body=body)
    error = caught.value.body
    assert words in error["message"] and error["param"] == param
