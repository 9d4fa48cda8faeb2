"""The agent frameworks people point at an OpenAI-compatible server, against shoal's app on 127.0.0.1 with the
demo model: langchain-openai (bind_tools auto / required / named, streamed and not; with_structured_output by
json_schema and by function_calling) and litellm (tools, response_format, streaming). Skipped where a
framework is not installed (pip install -e ".[test]" brings both)."""

from __future__ import annotations

import json
import os
from typing import Literal

import pytest
from pydantic import BaseModel, Field
from server_harness import API_KEY, MODEL

from shoal import LLM

jsonschema = pytest.importorskip("jsonschema")

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Za-z]{1,10}$"},
                                            "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"]}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                         "parameters": WEATHER}}
QUESTION = "What is the weather in Paris?"


class Person(BaseModel):
    """A person."""

    name: str = Field(pattern="^[a-z]{1,8}$")
    age: int = Field(ge=0, le=120)
    pet: Literal["cat", "dog"]


@pytest.fixture(scope="module")
def server(serve):
    # hermes: the demo's template has no tool markers; auto needs a parser to read the reply with.
    return serve(LLM(progress=False), tool_call_parser="hermes")


# ---- langchain-openai ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    return langchain_openai.ChatOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, model=MODEL, temperature=1.0,
                                       max_tokens=64, max_retries=0, timeout=60, seed=1)


@pytest.mark.parametrize("tool_choice", ["get_weather", "required"])
def test_langchain_bind_tools_forced(chat, tool_choice):
    # One call at most: an open array of calls, sampled, may run on to max_tokens.
    message = chat.bind_tools([TOOL], tool_choice=tool_choice, parallel_tool_calls=False).invoke(QUESTION)
    assert message.tool_calls and not message.invalid_tool_calls
    for call in message.tool_calls:
        assert call["name"] == "get_weather" and call["id"]
        jsonschema.validate(call["args"], WEATHER)


def test_langchain_bind_tools_streamed(chat):
    chunks = list(chat.bind_tools([TOOL], tool_choice="get_weather").stream(QUESTION))
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole = whole + chunk
    [call] = whole.tool_calls
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], WEATHER)


def test_langchain_bind_tools_auto_is_answered(chat):
    # The demo model has never seen a tool: under auto it answers in text, and that text comes back as content.
    message = chat.bind_tools([TOOL]).invoke(QUESTION)
    assert isinstance(message.content, str) and message.response_metadata["finish_reason"] in {"stop", "length",
                                                                                                "tool_calls"}


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(chat, method):
    people = [chat.with_structured_output(Person, method=method).invoke(f"Person number {i}") for i in range(3)]
    assert all(isinstance(p, Person) for p in people)  # pydantic validated each reply
    raw = chat.with_structured_output(Person, method=method, include_raw=True).invoke("Another person")
    assert raw["parsing_error"] is None and isinstance(raw["parsed"], Person)


# ---- litellm ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def litellm(server):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch its price list from the network
    litellm = pytest.importorskip("litellm")
    litellm.telemetry = False
    return litellm


def litellm_options(server) -> dict:
    return {"model": f"openai/{MODEL}", "api_base": f"{server.url}/v1", "api_key": API_KEY, "max_tokens": 64,
            "temperature": 1.0, "num_retries": 0, "timeout": 60}


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_litellm_tools(server, litellm, tool_choice):
    out = litellm.completion(messages=[{"role": "user", "content": QUESTION}], tools=[TOOL], tool_choice=tool_choice,
                             parallel_tool_calls=False, **litellm_options(server))
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_litellm_tools_streamed(server, litellm):
    chunks = list(litellm.completion(messages=[{"role": "user", "content": QUESTION}], tools=[TOOL],
                                     tool_choice="required", parallel_tool_calls=False, stream=True,
                                     **litellm_options(server)))
    message = litellm.stream_chunk_builder(chunks).choices[0].message
    [call] = message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_litellm_response_format(server, litellm):
    schema = Person.model_json_schema()
    out = litellm.completion(messages=[{"role": "user", "content": "A person"}], **litellm_options(server),
                             response_format={"type": "json_schema",
                                              "json_schema": {"name": "person", "schema": schema, "strict": True}})
    Person.model_validate_json(out.choices[0].message.content)
    out = litellm.completion(messages=[{"role": "user", "content": "A person"}], **litellm_options(server),
                             response_format={"type": "json_object"})
    assert out.choices[0].message.content.startswith("{")
