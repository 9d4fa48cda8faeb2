"""The conversations the chat-template tests render (OpenAI's wire form: tool-call arguments as JSON strings,
null content), each with the apply_chat_template options it is rendered with, shared by test_chat_templates
(hand-written and transformers-shipped templates) and test_template_corpus (llama.cpp's real ones)."""

from __future__ import annotations

import json

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city, now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}

# Conversations in OpenAI's wire form: tool-call arguments as JSON strings, null content.
PLAIN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Héllo wörld — what's new?"},
]
ONE_CALL = [
    {"role": "system", "content": "Use tools when they help."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
]
TWO_CALLS = [
    {"role": "user", "content": "Weather and time in Oslo?"},
    {"role": "assistant", "content": "Checking both.", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "C"}'}},
        {"id": "b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "a", "content": "3 C"},
    {"role": "tool", "tool_call_id": "b", "content": "14:05"},
    {"role": "assistant", "content": "3 C at 14:05."},
    {"role": "user", "content": "Thanks"},
]
REASONED = [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4", "reasoning_content": "Two and two make four."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6", "reasoning_content": "Three and three make six."},
]
PARTIAL = PLAIN + [{"role": "assistant", "content": "Not much, but"}]


def drops_null_keys() -> bool:
    """transformers since 5.2x leaves a message's null-valued keys out before rendering (shoal does the same)."""
    from transformers.utils import chat_template_utils

    return hasattr(chat_template_utils, "_normalize_chat_messages")


def transformers_messages(messages: list[dict]) -> list[dict]:
    """What transformers documents for tool-use templates: tool-call arguments as objects."""
    out = json.loads(json.dumps(messages))
    for message in out:
        for call in message.get("tool_calls") or []:
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    return out


CASES = [
    ("plain", PLAIN, {}),
    ("plain without a generation prompt", PLAIN, {"add_generation_prompt": False}),
    ("one tool call and its result", ONE_CALL, {"tools": [WEATHER]}),
    ("two tool calls, two results, more turns", TWO_CALLS, {"tools": [WEATHER, TIME]}),
    ("earlier reasoning, thinking off", REASONED, {"template_kwargs": {"enable_thinking": False}}),
    ("a date given as a template kwarg", PLAIN, {"template_kwargs": {"date_string": "26 Jul 2024"}}),
    ("continue the final message", PARTIAL, {"add_generation_prompt": False, "continue_final_message": True}),
    ("documents", PLAIN, {"documents": [{"title": "Paris", "text": "The capital of France."}]}),
]


# Two more in the shapes stricter real templates insist on (Mistral's 9-character alphanumeric call ids, a
# description on every tool, content "" rather than absent; Hermes and Command-R, which iterate `tools`).
TIMER = {"type": "function", "function": {"name": "get_time", "description": "The time in a city, now.",
                                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
STRICT_CALLS = [
    {"role": "system", "content": "Answer with tools."},
    {"role": "user", "content": "Weather and time in Oslo?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "a1b2c3d4e", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        {"id": "f5g6h7i8j", "type": "function", "function": {"name": "get_time", "arguments": '{"city": "Oslo"}'}}]},
    {"role": "tool", "tool_call_id": "a1b2c3d4e", "name": "get_weather", "content": "3 C"},
    {"role": "tool", "tool_call_id": "f5g6h7i8j", "name": "get_time", "content": "14:05"},
    {"role": "assistant", "content": "3 C at 14:05."},
    {"role": "user", "content": "And tomorrow?"},
]
MORE_CASES = [
    ("tools offered, none called", PLAIN, {"tools": [WEATHER, TIMER]}),
    ("strict ids, described tools, empty content", STRICT_CALLS, {"tools": [WEATHER, TIMER]}),
]


def transformers_options(options: dict) -> dict:
    """A case's options as apply_chat_template's keyword arguments (template kwargs spread, as transformers takes them)."""
    options = dict(options)
    template_kwargs = options.pop("template_kwargs", {})
    return {"add_generation_prompt": options.pop("add_generation_prompt", True), **options, **template_kwargs}


def server_conversation(messages: list[dict], options: dict):
    """The case as the server renders it: the request body parsed, then handed to shoal.server.conversation."""
    from shoal.server.conversation import conversation
    from shoal.server.protocol import ChatCompletionRequest

    body = {"messages": messages, "tools": options.get("tools"),
            "add_generation_prompt": options.get("add_generation_prompt", True),
            "continue_final_message": options.get("continue_final_message", False),
            "chat_template_kwargs": options.get("template_kwargs", {}), "documents": options.get("documents")}
    request = ChatCompletionRequest.model_validate_json(json.dumps(body))
    return conversation(request.messages, request.tools, request.add_generation_prompt,
                        request.continue_final_message, request.chat_template_kwargs, request.documents)
