"""Reasoning parsers (`--reasoning-parser`): a thinking model's `<think>...</think>` goes to reasoning_content,
the rest to content, the same however the text is cut (every chunk size from 1 up); through the server with
the official client, whole and streamed, beside tool calls, and off when the request turns thinking off."""

from __future__ import annotations

import json

import pytest

from shoal.server.reasoning import REASONING_PARSERS, ReasoningParser, reasoning_parser
from scripted_engine import script_engine

CASES = [
    # (model text, reasoning, content)
    ("<think>\nLet me add: 2 + 2.\n</think>\n\nIt is 4.", "\nLet me add: 2 + 2.\n", "\n\nIt is 4."),
    ("The template opened <think> already. So 4.</think>4", "The template opened <think> already. So 4.", "4"),
    ("\n<think>short</think>", "short", None),
    ("Still thinking when cut off, </thi", "Still thinking when cut off, </thi", None),
    ("</think>Straight to the answer, a < b.", None, "Straight to the answer, a < b."),
    ("<thin", "<thin", None),
]


def chunked(text: str, size: int, thinking: bool = True) -> tuple[str, str]:
    parser, reasoning, content = ReasoningParser(thinking), "", ""
    for at in range(0, len(text), size):
        r, c = parser.feed(text[at : at + size])
        reasoning, content = reasoning + r, content + c
    r, c = parser.finish()
    return reasoning + r, content + c


@pytest.mark.parametrize("text, reasoning, content", CASES)
def test_every_chunk_size_splits_the_same(text, reasoning, content):
    assert ReasoningParser().split(text) == (reasoning, content)
    for size in range(1, len(text) + 1):
        assert chunked(text, size) == (reasoning or "", content or ""), size


def test_thinking_off_makes_everything_content():
    text = "<think>x</think>y"
    assert ReasoningParser(thinking=False).split(text) == (None, text)
    assert reasoning_parser("qwen3", {"enable_thinking": False}).split(text) == (None, text)
    assert reasoning_parser("qwen3", None).split(text) == ("x", "y")
    assert reasoning_parser("deepseek_v3", None).split(text) == (None, text)  # V3.1 thinks only when asked
    assert reasoning_parser("deepseek_v3", {"thinking": True}).split(text) == ("x", "y")
    assert reasoning_parser("deepseek_r1", {"enable_thinking": False}).split(text) == ("x", "y")
    assert set(REASONING_PARSERS) == {"deepseek_r1", "deepseek_v3", "qwen3"}
    with pytest.raises(ValueError, match="known: deepseek_r1"):
        reasoning_parser("granite", None)


# ---- through the server: a scripted engine writes the model's text (see test_tool_parsers.scripted) ----------
@pytest.fixture(scope="module")
def server(serve, tmp_path_factory):
    from chat_checkpoints import long_context_checkpoint

    from shoal import LLM

    path = long_context_checkpoint(tmp_path_factory, "chatml_tools")  # <think> and <tool_call> are special tokens
    return serve(LLM(str(path), dtype="float32", progress=False), reasoning_parser="qwen3")


@pytest.fixture
def scripted(server, monkeypatch):
    return script_engine(server, monkeypatch, "<think>Paris is in France.</think>It is sunny.</s>")


ASK = [{"role": "user", "content": "Weather in Paris?"}]


def test_reasoning_content_whole_and_streamed(server, scripted):
    from server_harness import MODEL

    client = server.client()
    out = client.chat.completions.create(model=MODEL, messages=ASK)
    message = out.choices[0].message
    assert message.reasoning_content == "Paris is in France." and message.content == "It is sunny."
    assert scripted.params[0].skip_special_tokens is False  # <think> is special here: it must reach the parser
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "Paris is in France."
    assert "".join(d.content or "" for d in deltas) == "It is sunny."
    off = client.chat.completions.create(model=MODEL, messages=ASK,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert off.choices[0].message.content == "<think>Paris is in France.</think>It is sunny."
    assert off.choices[0].message.reasoning_content is None


def test_reasoning_then_a_tool_call(server, scripted):
    from server_harness import MODEL

    scripted.text = ('<think>I should look it up.</think>\n<tool_call>\n{"name": "get_weather", "arguments": '
                     '{"city": "Paris"}}\n</tool_call></s>')
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    out = server.client().chat.completions.create(model=MODEL, messages=ASK, tools=tools)
    choice = out.choices[0]
    assert choice.message.reasoning_content == "I should look it up."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        ("get_weather", {"city": "Paris"})]
    assert choice.finish_reason == "tool_calls"


# ---- structured outputs after the reasoning: the real model, its first token pushed to </think> -------------
ANSWER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
          "additionalProperties": False}


def test_a_constraint_holds_the_answer_after_the_reasoning_not_the_reasoning(server):
    """With a reasoning parser the grammar starts after </think> (vLLM's structured outputs with reasoning): the
    model may write </think> first, which a JSON grammar from the first token would forbid, and the answer after it
    still matches the schema; with thinking turned off the grammar holds the reply from its first token."""
    from jsonschema import validate
    from server_harness import MODEL

    from shoal.server.protocol import ChatCompletionRequest
    from shoal.server.reply import plan_chat

    tokenizer = server.app.state.serving.tokenizer
    end = tokenizer.token_to_id("</think>")
    schema = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}}
    client = server.client()
    for kwargs, starts_after in [({}, "</think>"), ({"enable_thinking": False}, None)]:
        body = {"model": MODEL, "messages": ASK, "response_format": schema, "chat_template_kwargs": kwargs}
        plan = plan_chat(ChatCompletionRequest.model_validate(body), None, "qwen3", tokenizer.token_to_id,
                         tokenizer.is_special)
        assert plan.constraint.start_after == starts_after
        out = client.chat.completions.create(model=MODEL, messages=ASK, response_format=schema, max_tokens=40,
                                             logit_bias={str(end): 100}, logprobs=True,
                                             extra_body={"chat_template_kwargs": kwargs})
        message, tokens = out.choices[0].message, [t.token for t in out.choices[0].logprobs.content]
        validate(json.loads(message.content), ANSWER)
        assert message.reasoning_content is None
        assert (tokens[0] == "</think>") == (starts_after is not None)  # free to end its reasoning at once
        assert "</think>" not in tokens[1:]  # and held to the schema from then on, bias or not

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": ANSWER}}]
    forced = client.chat.completions.create(model=MODEL, messages=ASK, tools=tools, tool_choice="required",
                                            max_tokens=80, logit_bias={str(end): 100})
    call = forced.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    validate(json.loads(call.function.arguments), ANSWER)
